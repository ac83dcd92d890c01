"""The layers hold (import-linter's contracts in pyproject.toml): the gateway reaches ``engines``
only through the sealed contract, the contract imports nothing else of the project, engines never
import the gateway, and no ML library is imported by the gateway or the contract, at module level or
inside a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "engines", "telemetry")
CONTRACTS = ("gateway imports only the contract of engines", "the contract imports nothing else of the project",
             "engines never import the gateway", "no ML library in the gateway or the contract")


def lint_imports(root: Path) -> tuple[int, str]:
    """Run import-linter on the packages under ``root`` with the project's contracts."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_project_keeps_every_contract() -> None:
    code, out = lint_imports(ROOT)
    assert code == 0, out
    for name in CONTRACTS:
        assert f"{name} KEPT" in out, out


def test_each_contract_breaks_when_its_layer_is_crossed(tmp_path: Path) -> None:
    # A copy of the packages, each rule crossed once, inside a function (as lazy imports are).
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    crossings = {"gateway/app.py": "import engines.worker", "engines/contract/keys.py": "import telemetry.logs",
                 "engines/worker.py": "import gateway.settings", "engines/contract/messages.py": "import torch"}
    for path, statement in crossings.items():
        with open(tmp_path / path, "a") as f:
            f.write(f"\n\ndef _crossing() -> None:\n    {statement}\n")
    code, out = lint_imports(tmp_path)
    assert code != 0
    for name in CONTRACTS:
        assert f"{name} BROKEN" in out, out
