"""``conduit engine``'s flags reach the engine's settings (the parser only; nothing is started)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engines.cli import diffusers_settings, missing_model
from telemetry.setup import Telemetry
from tests.commandline import parse_conduit

ROOT = Path(__file__).resolve().parents[2]


def test_diffusers_limits_come_from_flags() -> None:
    args = parse_conduit(["engine", "--kind", "diffusers", "--model", "/models/sd", "--max-size", "64",
                          "--max-steps", "4", "--default-steps", "2", "--max-batch-pixels", "65536"])
    s = diffusers_settings(args, "/models/sd")
    assert (s.max_size, s.max_steps, s.default_steps, s.max_batch_pixels) == (64, 4, 2, 65536)
    assert s.model == "/models/sd" and s.served_name is None


def test_diffusers_limits_default_to_the_engines_own() -> None:
    from engines.diffusers_engine import DiffusersSettings

    s = diffusers_settings(parse_conduit(["engine", "--kind", "diffusers"]), "/models/sd")
    d = DiffusersSettings(model="/models/sd")
    assert (s.max_size, s.max_steps, s.default_steps, s.max_batch_pixels) == (d.max_size, d.max_steps,
                                                                             d.default_steps, d.max_batch_pixels)


def test_vllm_gpu_flags_reach_the_engine_settings() -> None:
    from engines.cli import vllm_settings

    args = parse_conduit(["engine", "--kind", "vllm", "--model", "/models/llama", "--served-name", "llama",
                          "--gpu-memory-utilization", "0.45", "--tensor-parallel-size", "2",
                          "--max-model-len", "8192", "--tool-call-parser", "llama3_json"])
    s = vllm_settings(args, "/models/llama")
    assert (s.gpu_memory_utilization, s.tensor_parallel_size, s.max_model_len) == (0.45, 2, 8192)
    assert (s.served_name, s.tool_call_parser, s.enable_auto_tool_choice) == ("llama", "llama3_json", False)
    assert s.extra_engine_args == {}
    tiny = vllm_settings(parse_conduit(["engine", "--kind", "vllm", "--cpu"]), "/cache/tiny-llama")
    assert tiny.served_name == "tiny-llama" and tiny.tool_call_parser == "hermes" and tiny.enable_auto_tool_choice
    assert tiny.extra_engine_args == {"distributed_executor_backend": "uni"}
    assert tiny.gpu_memory_utilization == 0.9 and tiny.tensor_parallel_size == 1  # vLLM's own defaults


def test_media_and_dead_letter_flags_reach_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.cli import worker_settings

    domains = "img.example.com, *.cdn.example.net"
    s = worker_settings(parse_conduit(["engine", "--kind", "synthetic", "--media-domains", domains,
                                       "--media-max-bytes", "1000", "--dead-letter-maxlen", "50",
                                       "--dead-letter-max-age-s", "3600"]))
    assert (s.media_domains, s.media_max_bytes) == (["img.example.com", "*.cdn.example.net"], 1000)
    assert (s.dead_letter_maxlen, s.dead_letter_max_age_s) == (50, 3600.0)
    assert worker_settings(parse_conduit(["engine", "--kind", "synthetic"])).media_domains == []  # fetching off
    # The gateways' variable configures an engine too, so one list serves both.
    monkeypatch.setenv("CONDUIT_MEDIA_DOMAINS", "img.example.com")
    assert worker_settings(parse_conduit(["engine", "--kind", "synthetic"])).media_domains == ["img.example.com"]


@pytest.mark.parametrize("flag", ["--media-max-bytes", "--dead-letter-maxlen", "--dead-letter-max-age-s"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_byte_and_dead_letter_bounds_must_be_positive(flag: str, value: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """0 or less would refuse every image, or make Redis drop each dead letter as it is written
    (PEXPIRE 0 deletes the key): the engine refuses to start with it."""
    with pytest.raises(SystemExit) as info:
        parse_conduit(["engine", "--kind", "synthetic", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: must be a positive number, not {value}" in capsys.readouterr().err


def test_cpu_engine_environment_only_for_a_cpu_engine() -> None:
    from engines.cli import cpu_engine_environment

    # A GPU engine keeps the hub reachable (models by Hugging Face id) and vLLM's GPU defaults.
    assert cpu_engine_environment(cpu_flag=False, cpu_build=False) == {}
    assert cpu_engine_environment(cpu_flag=True, cpu_build=False)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert cpu_engine_environment(cpu_flag=False, cpu_build=True)["HF_HUB_OFFLINE"] == "1"


def test_conduit_engine_does_not_import_from_the_working_directory(tmp_path: Path) -> None:
    # `conduit engine` execs `python -m engines serve`; `-m` alone would put the working directory
    # first on sys.path, so a `vllm/` or `argparse.py` where an engine starts would be imported.
    (tmp_path / "argparse.py").write_text('raise SystemExit("shadowed by the working directory")\n')
    entry = tmp_path / "bin"
    entry.mkdir()
    (entry / "conduit").write_text("import sys\nfrom gateway.cli import main\nsys.exit(main())\n")
    done = subprocess.run([sys.executable, str(entry / "conduit"), "engine", "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert "shadowed" not in done.stdout + done.stderr
    assert done.returncode == 0 and done.stdout.startswith("usage: conduit engine ")


def test_build_tiny_speaks_as_conduit_models() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: conduit models build-tiny ")


def test_engine_metrics_listen_on_loopback_unless_told() -> None:
    """An engine's /metrics, /health and /ready answer on 127.0.0.1 unless ``--metrics-host`` says
    otherwise: a GPU box's metrics port is not open to every network it is on by default
    (compose and Kubernetes name 0.0.0.0 themselves, tests/unit/test_compose.py)."""
    args = parse_conduit(["engine", "--kind", "synthetic", "--metrics-port", "9100"])
    assert args.metrics_host == "127.0.0.1"
    assert parse_conduit(["engine", "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"
    telemetry = Telemetry("conduit-engine", "test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    telemetry.serve(port)
    try:
        assert telemetry._server is not None and telemetry._server.server_address == ("127.0.0.1", port)
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize("model", [None, "tiny", "gpt2", "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.1-8B-Instruct",
                                   "models/model"])
def test_a_hub_id_or_tiny_is_a_model(model: str | None) -> None:
    assert missing_model(model) == ""


def test_a_path_that_exists_is_a_model(tmp_path: Path) -> None:
    assert missing_model(str(tmp_path)) == ""


@pytest.mark.parametrize("model", ["/models/model", "./model", "~/no-such-model-here", "models/a/b", "../m/x"])
def test_a_path_that_is_not_there_is_named(model: str) -> None:
    said = missing_model(model)
    assert model in said and "--model" in said and "CONDUIT_MODELS_DIR" in said
