"""Settings from the environment (``CONDUIT_*``), as containers and `.env` files give them."""

from __future__ import annotations

from gateway.settings import GatewaySettings


def test_list_settings_split_on_commas_and_drop_empty_entries() -> None:
    # `CONDUIT_MODELS=` (an empty line in a .env file) means no models, not one named "".
    assert GatewaySettings.from_env({"CONDUIT_MODELS": ""}).models == []
    assert GatewaySettings.from_env({"CONDUIT_MODELS": "tiny-llama, tiny-sd,"}).models == ["tiny-llama", "tiny-sd"]


def test_booleans_and_numbers_come_as_text() -> None:
    s = GatewaySettings.from_env({"CONDUIT_AUTH": "false", "CONDUIT_TRACE_SAMPLE_RATIO": "0.25",
                                  "CONDUIT_LOG_PROMPTS": "true", "CONDUIT_OTLP_ENDPOINT": "http://c:4318"})
    assert (s.auth, s.trace_sample_ratio, s.log_prompts, s.otlp_endpoint) == (False, 0.25, True, "http://c:4318")


def test_redis_urls_are_logged_without_their_password() -> None:
    from engines.contract.lane import redacted

    assert redacted("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redacted("rediss://app:s3cret@redis.internal:6380/1") == "rediss://app:***@redis.internal:6380/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
