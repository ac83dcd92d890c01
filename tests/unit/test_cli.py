"""``conduit engine``'s flags reach the engine's settings (the parser only; nothing is started)."""

from __future__ import annotations

from gateway.cli import build_parser, diffusers_settings


def test_diffusers_limits_come_from_flags() -> None:
    args = build_parser().parse_args(["engine", "--kind", "diffusers", "--model", "/models/sd", "--max-size", "64",
                                      "--max-steps", "4", "--default-steps", "2", "--max-batch-pixels", "65536"])
    s = diffusers_settings(args, "/models/sd")
    assert (s.max_size, s.max_steps, s.default_steps, s.max_batch_pixels) == (64, 4, 2, 65536)
    assert s.model == "/models/sd" and s.served_name is None


def test_diffusers_limits_default_to_the_engines_own() -> None:
    from engines.diffusers_engine import DiffusersSettings

    s = diffusers_settings(build_parser().parse_args(["engine", "--kind", "diffusers"]), "/models/sd")
    d = DiffusersSettings(model="/models/sd")
    assert (s.max_size, s.max_steps, s.default_steps, s.max_batch_pixels) == (d.max_size, d.max_steps,
                                                                             d.default_steps, d.max_batch_pixels)
