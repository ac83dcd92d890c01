"""The gateway, the wire contract and the engine runtime import no ML library.

A gateway must start in milliseconds on a box without torch, and ``conduit engine`` must
reach vLLM only when it starts one. Each check runs in a fresh interpreter, since this
test process may already have imported anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ML_LIBRARIES = ("torch", "vllm", "diffusers", "transformers")
LIGHT_MODULES = ("gateway.app", "gateway.cli", "gateway.flow", "engines.contract.messages", "engines.worker",
                 "engines.synthetic", "telemetry.setup")

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def imported_top_level_packages(*modules: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"importing {modules} failed:\n{proc.stderr}"
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_probe_sees_what_a_module_imports() -> None:
    # Without this, a probe that never imported anything would pass the tests below.
    assert {"json", "msgspec", "engines"} <= imported_top_level_packages("engines.contract.messages")


def test_light_modules_import_no_ml_library() -> None:
    loaded = imported_top_level_packages(*LIGHT_MODULES)
    assert {"gateway", "engines", "telemetry", "litestar"} <= loaded
    assert not loaded & set(ML_LIBRARIES), f"ML libraries imported: {sorted(loaded & set(ML_LIBRARIES))}"


def test_vllm_engine_imports_vllm_lazily() -> None:
    if not (ROOT / "engines" / "vllm_engine.py").exists():
        pytest.skip("engines/vllm_engine.py does not exist yet; nothing to check for lazy vLLM imports")
    loaded = imported_top_level_packages("engines.vllm_engine")
    assert "engines" in loaded
    assert not loaded & set(ML_LIBRARIES), f"ML libraries imported: {sorted(loaded & set(ML_LIBRARIES))}"
