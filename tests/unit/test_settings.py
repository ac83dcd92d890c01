"""Settings from the environment (``CONDUIT_*``), as containers and `.env` files give them."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gateway.settings import CONCERNS, GatewaySettings, setting_names


def test_list_settings_split_on_commas_and_drop_empty_entries() -> None:
    # `CONDUIT_MODELS=` (an empty line in a .env file) means no models, not one named "".
    assert GatewaySettings.from_env({"CONDUIT_MODELS": ""}).queue.models == []
    assert GatewaySettings.from_env({"CONDUIT_MODELS": "tiny-llama, tiny-sd,"}).queue.models == [
        "tiny-llama", "tiny-sd"]


def test_booleans_and_numbers_come_as_text() -> None:
    s = GatewaySettings.from_env({"CONDUIT_AUTH": "false", "CONDUIT_TRACE_SAMPLE_RATIO": "0.25",
                                  "CONDUIT_LOG_PROMPTS": "true", "CONDUIT_OTLP_ENDPOINT": "http://c:4318"})
    assert (s.tenancy.auth, s.telemetry.trace_sample_ratio, s.telemetry.log_prompts,
            s.telemetry.otlp_endpoint) == (False, 0.25, True, "http://c:4318")


def test_redis_urls_are_logged_without_their_password() -> None:
    from engines.contract.lane import redacted

    assert redacted("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redacted("rediss://app:s3cret@redis.internal:6380/1") == "rediss://app:***@redis.internal:6380/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_password_in_the_urls_query_is_hidden_too() -> None:
    """redis-py also takes ``?password=`` (and ``?username=``, not a secret, kept)."""
    from engines.contract.lane import redacted
    from gateway.settings import RedisSettings

    assert redacted("redis://h:1/0?password=s3cret") == "redis://h:1/0?password=***"
    assert redacted("rediss://h:1/0?ssl_ca_certs=/ca.crt&username=app&password=s3cret&password=two") \
        == "rediss://h:1/0?ssl_ca_certs=/ca.crt&username=app&password=***&password=***"
    assert redacted("redis://u:one@h:1/0?password=s3cret") == "redis://u:***@h:1/0?password=***"
    assert redacted("redis://h:1/0?ssl_ca_certs=/ca.crt") == "redis://h:1/0?ssl_ca_certs=/ca.crt"
    assert "s3cret" not in repr(RedisSettings(redis_url="redis://h:1/0?password=s3cret"))


def test_each_concern_gets_its_settings_from_flat_names(tmp_path: Path) -> None:
    # A file of flat names (as before the split) or of one table per concern; variables win.
    flat = tmp_path / "flat.toml"
    flat.write_text('max_backlog = 7\nauth = false\nmax_choices = 9\nimage_url_ttl_s = 60.0\n')
    tables = tmp_path / "tables.toml"
    tables.write_text('[queue]\nmax_backlog = 7\n[tenancy]\nauth = false\n[bounds]\nmax_choices = 9\n'
                      '[images]\nimage_url_ttl_s = 60.0\n')
    for file in (flat, tables):
        s = GatewaySettings.from_env({"CONDUIT_MAX_CHOICES": "11", "CONDUIT_PORT": "9000"}, file=str(file))
        assert (s.queue.max_backlog, s.tenancy.auth, s.bounds.max_choices) == (7, False, 11)
        assert (s.images.image_url_ttl_s, s.server.port) == (60.0, 9000)
    assert GatewaySettings.from_env({}, max_output_work=10).bounds.max_output_work == 10


def test_every_setting_has_one_flat_name() -> None:
    names = [f.name for concern in CONCERNS.values() for f in msgspec.structs.fields(concern)]
    assert len(names) == len(set(names)), "two concerns name a setting alike: CONDUIT_<NAME> would be ambiguous"
    assert set(setting_names()) == {"gateway_id", *names}
    assert {"redis_url", "max_backlog", "max_choices", "auth", "metrics", "image_store", "port"} <= set(names)


def test_a_setting_in_another_concerns_table_is_refused(tmp_path: Path) -> None:
    # Dropped silently, `metrics_auth` under [queue] would leave /metrics open.
    f = tmp_path / "c.toml"
    f.write_text("[queue]\nmetrics_auth = true\n")
    with pytest.raises(ValueError, match=r"metrics_auth.*\[tenancy\]"):
        GatewaySettings.from_env({}, file=str(f))


def test_the_redis_password_never_shows_in_a_repr() -> None:
    """Settings reach logs and tracebacks; a Redis password (apart or in the URL) never does."""
    from engines.worker import WorkerSettings

    settings = GatewaySettings.from_env({"CONDUIT_REDIS_PASSWORD": "apart-secret",
                                         "CONDUIT_REDIS_URL": "redis://gateway:url-secret@redis:6379/0"})
    assert settings.redis.redis_password == "apart-secret"
    assert "secret" not in repr(settings) and "secret" not in repr(settings.redis)
    worker = WorkerSettings(redis_url="redis://engine:url-secret@redis:6379/0", redis_password="apart-secret")
    assert "secret" not in repr(worker)


def test_the_cold_start_wait_is_bounded_by_the_request_timeout() -> None:
    settings = GatewaySettings.from_env({"CONDUIT_COLD_START_TIMEOUT_S": "120", "CONDUIT_REQUEST_TIMEOUT_S": "120"})
    assert settings.queue.cold_start_timeout_s == 120
    assert GatewaySettings.from_env({}).queue.cold_start_timeout_s == 0  # off: a 503 at once, as before
    for bad in ("121", "-1"):
        with pytest.raises(msgspec.ValidationError, match="cold_start_timeout_s"):
            GatewaySettings.from_env({"CONDUIT_COLD_START_TIMEOUT_S": bad, "CONDUIT_REQUEST_TIMEOUT_S": "120"})
