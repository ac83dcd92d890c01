"""API key text, records and validation (no I/O; the failure limiter: ``test_failures.py``)."""

from __future__ import annotations

import time

import msgspec
import pytest

from gateway.context import principal_of
from gateway.tenancy.auth import _bearer
from gateway.tenancy.guard import _limit_headers
from gateway.tenancy.keys import HASHER, InvalidKeyField, KeyChanges, KeyRecord, new_key_text, parse_key, validate
from gateway.tenancy.principal import ANONYMOUS, KeyLimits


def test_key_text_is_prefix_id_secret_and_parses_back() -> None:
    seen = set()
    for _ in range(50):
        key_id, secret, text = new_key_text()
        assert text == f"cdt-{key_id}-{secret}" and len(key_id) == 12 and len(secret) == 43
        assert parse_key(text) == (key_id, secret)
        seen.add(secret)
    assert len(seen) == 50


@pytest.mark.parametrize("text", ["", "cdt-", "sk-abc", "cdt-ABCDEF012345-" + "a" * 43, "cdt-0123456789ab-" + "a" * 42,
                                  "cdt-0123456789ab-" + "a" * 44, "cdt-0123456789ab-" + "a" * 42 + "!",
                                  "xyz-0123456789ab-" + "a" * 43, " cdt-0123456789ab-" + "a" * 43])
def test_malformed_keys_do_not_parse(text: str) -> None:
    assert parse_key(text) is None


def test_hasher_is_argon2id_with_the_documented_parameters() -> None:
    digest = HASHER.hash("secret")
    assert digest.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert HASHER.verify(digest, "secret")


def test_record_round_trips_and_its_views_hold_no_hash() -> None:
    rec = KeyRecord(id="0123456789ab", name="n", hash="$argon2id$x", owner="o", created_ms=1, models=["a", "b"],
                    limits=KeyLimits(rpm=5, priority=2))
    data = msgspec.msgpack.encode(rec)
    assert msgspec.msgpack.decode(data, type=KeyRecord) == rec
    info = msgspec.json.encode(rec.info())
    assert b"argon2" not in info and b"hash" not in info
    principal = rec.principal()
    assert principal.key_id == "0123456789ab" and principal.allows("a") and not principal.allows("c")
    assert principal.limits.rpm == 5


def test_expiry_is_checked_against_the_clock() -> None:
    now = int(time.time() * 1000)
    assert KeyRecord(id="0" * 12, name="n", hash="h", expires_ms=now - 1).expired()
    assert not KeyRecord(id="0" * 12, name="n", hash="h", expires_ms=now + 60_000).expired()
    assert not KeyRecord(id="0" * 12, name="n", hash="h").expired()


@pytest.mark.parametrize(("fields", "param"), [({"name": ""}, "name"), ({"name": "x" * 200}, "name"),
                                               ({"owner": "a\nb"}, "owner"), ({"models": [""]}, "models"),
                                               ({"limits": KeyLimits(rpm=-1)}, "limits.rpm"),
                                               ({"limits": KeyLimits(priority=0)}, "limits.priority"),
                                               ({"limits": KeyLimits(priority=10**21)}, "limits.priority"),
                                               ({"limits": KeyLimits(tpm=2**64)}, "limits.tpm"),
                                               ({"expires_ms": 2**64}, "expires_ms"),
                                               ({"limits": KeyLimits(backlog_share=1.5)}, "limits.backlog_share")])
def test_validation_names_the_field(fields: dict[str, object], param: str) -> None:
    rec = msgspec.structs.replace(KeyRecord(id="0" * 12, name="n", hash="h"), **fields)
    with pytest.raises(InvalidKeyField) as exc:
        validate(rec)
    assert exc.value.param == param


def test_changes_refuse_unknown_fields_and_tell_unset_from_null() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"hash": "x"}', type=KeyChanges)
    changes = msgspec.json.decode(b'{"models": null}', type=KeyChanges)
    assert changes.models is None and changes.name is msgspec.UNSET


def test_bearer_header_parsing() -> None:
    assert _bearer("Bearer abc") == "abc"
    assert _bearer("bearer  abc ") == "abc"
    assert _bearer("Basic abc") == ""
    assert _bearer("abc") == ""
    assert _bearer(None) == ""


def test_rate_limit_headers_and_principal_lookup() -> None:
    assert _limit_headers({"x-ratelimit-limit-requests": 60, "remaining-requests": "59"}) == [
        (b"x-ratelimit-limit-requests", b"60"), (b"x-ratelimit-remaining-requests", b"59")]
    assert principal_of({}) is ANONYMOUS
    assert principal_of({"state": {}}) is ANONYMOUS


async def test_a_full_verdict_cache_forgets_the_least_recently_used_verdict_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Emptied all at once, a full cache made every key in use pay argon2 again at the same moment.
    import redis.asyncio as aioredis

    from engines.contract.keys import Keys
    from gateway.errors import Unauthorized
    from gateway.tenancy import auth
    from gateway.tenancy.keys import KeyStore

    monkeypatch.setattr(auth, "_CACHE_MAX", 4)
    verified: list[str] = []
    matches = auth._matches
    monkeypatch.setattr(auth, "_matches", lambda hashed, text: verified.append(text) or matches(hashed, text))
    authenticator = auth.Authenticator(KeyStore(aioredis.Redis(), Keys("t")), admin_hash=HASHER.hash("admin-text"),
                                       failures=1000)
    try:
        await authenticator.authenticate_admin("Bearer admin-text", "10.0.0.1")
        for i in range(3):
            with pytest.raises(Unauthorized):
                await authenticator.authenticate_admin(f"Bearer wrong-{i}", "10.0.0.1")
        await authenticator.authenticate_admin("Bearer admin-text", "10.0.0.1")  # full; now the most recent
        with pytest.raises(Unauthorized):
            await authenticator.authenticate_admin("Bearer wrong-3", "10.0.0.1")  # evicts wrong-0 alone
        await authenticator.authenticate_admin("Bearer admin-text", "10.0.0.1")
        with pytest.raises(Unauthorized):
            await authenticator.authenticate_admin("Bearer wrong-1", "10.0.0.1")
        assert verified == ["admin-text", "wrong-0", "wrong-1", "wrong-2", "wrong-3"]
    finally:
        authenticator.close()
