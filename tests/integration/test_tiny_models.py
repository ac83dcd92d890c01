"""``conduit models build-tiny``: both tiny models, their paths printed, a second run a no-op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT


def build_tiny(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_build_tiny_builds_both_then_nothing(tmp_path: Path) -> None:
    llama, sd = tmp_path / "llama", tmp_path / "sd"
    assert build_tiny("--path", str(llama), "--sd-path", str(sd)) == [str(llama), str(sd)]
    assert json.loads((llama / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((sd / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    stamps = {p: p.stat().st_mtime_ns for p in (llama / "config.json", sd / "model_index.json")}
    # Built already: each path printed again, nothing rewritten.
    assert build_tiny("--path", str(llama), "--sd-path", str(sd), "--only", "sd") == [str(sd)]
    assert build_tiny("--path", str(llama), "--sd-path", str(sd), "--only", "llama") == [str(llama)]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_default_places_under_the_cache_dir(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--only", "sd"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CONDUIT_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [str(tmp_path / "models" / "tiny-sd")]
