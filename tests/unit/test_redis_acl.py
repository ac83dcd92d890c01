"""The Redis users (engines/contract/acl.py): derived from every key name, each role kept to its own.

Redis's glob (``stringmatchlen``) and :func:`fnmatch.fnmatchcase` agree on the patterns here
(``*`` and literal characters only), so the names are matched as Redis would match them. That
the users work for real, and are refused for real, is tests/integration/test_redis_acl.py.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

from engines.contract.acl import (BASE_ROLES, HELPERS, ROLE_NAMES, ROLES, acl_file, channels, name_patterns,
                                  user_rules)
from engines.contract.keys import EVERY_KEY, Keys

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "conduit"


def examples(keys: Keys) -> dict[str, list[str]]:
    """A concrete name of each kind, as the code makes it (odd model names included)."""
    return {
        "engines": [keys.engines], "engine_info": [keys.engine_info], "models_seen": [keys.models_seen],
        "jobs": [keys.jobs("llama-3.1-8b"), keys.jobs("org/model:v2")],
        "engine_jobs": [keys.engine_jobs("sd", "gpu-7-1234-abcdef")], "job": [keys.job("sd", "job-123")],
        "replies": [keys.replies("gw-host-1-ab12")], "reply_generation": [keys.reply_generation("gw-host-1-ab12")], "result": [keys.result("job-123")],
        "dead_letters": [keys.dead_letters("sd")], "wait": [keys.wait("sd", "0123456789ab"), keys.wait("sd", "")],
        "ring": [keys.ring("sd")], "fair_state": [keys.fair_state("sd")], "weights": [keys.weights("sd")],
        "tenant_backlog": [keys.tenant_backlog("sd", "0123456789ab")], "queued_bytes": [keys.queued_bytes("sd")],
        "queued_jobs": [keys.queued_jobs("sd")], "image": [keys.image("img_" + "0" * 32 + ".png")],
        "api_key": [keys.api_key("0123456789ab")], "keys_index": [keys.keys_index],
        "keys_version": [keys.keys_version], "rate_limits": list(keys.rate_limits("0123456789ab")),
        "usage": [keys.usage("0123456789ab", "20261206")], "idempotency": [keys.idempotency("0123456789ab", "f" * 64)],
        "idempotency_bytes": [keys.idempotency_bytes("0123456789ab")],
        "stored_response": [keys.stored_response("0123456789ab", "resp_" + "0" * 24), keys.stored_response("", "resp_1")],
        "response_charged": [keys.response_charged("0123456789ab", "resp_" + "0" * 24)],
        "stored_response_ledger": [*keys.stored_response_ledger("0123456789ab"), *keys.stored_response_ledger(""),
                                   *keys.stored_response_ledger(EVERY_KEY)],
    }


def reachable(role: str, name: str, *, write: bool) -> bool:
    rules = user_rules(PREFIX, role)
    patterns = [r[1:] for r in rules if r.startswith("~")] + ([] if write else [r[3:] for r in rules
                                                                             if r.startswith("%R~")])
    return any(fnmatchcase(name, p) for p in patterns)


def test_every_redis_name_has_its_patterns() -> None:
    """A key added to ``Keys`` fails here until acl.py says who may use it."""
    members = {n for n, _ in inspect.getmembers(Keys(PREFIX)) if not n.startswith("_")}
    named = set(name_patterns(Keys(PREFIX))) | set(channels(Keys(PREFIX)))
    assert members - HELPERS == named
    assert set(examples(Keys(PREFIX))) == set(name_patterns(Keys(PREFIX)))
    for kind, names in examples(Keys(PREFIX)).items():
        for name in names:
            matching = [k for k, patterns in name_patterns(Keys(PREFIX)).items()
                        if any(fnmatchcase(name, p) for p in patterns)]
            assert matching == [kind], f"{name} matches the patterns of {matching}"


def test_each_role_reaches_exactly_its_names() -> None:
    key_names = {"api_key", "keys_index", "keys_version", "rate_limits", "usage", "idempotency", "idempotency_bytes",
                 "stored_response", "stored_response_ledger", "response_charged"}
    for kind, names in examples(Keys(PREFIX)).items():
        for name in names:
            assert reachable("gateway", name, write=True), name
            assert reachable("engine", name, write=True) == (kind not in key_names), name
            assert not reachable("engine", name, write=False) or kind not in key_names, name
            assert reachable("admin", name, write=True) == (kind in {"api_key", "keys_index", "keys_version"}), name
            assert reachable("admin", name, write=False) == (kind in {"api_key", "keys_index", "keys_version",
                                                                      "usage"}), name
            assert not reachable("autoscaler", name, write=True), name
            assert reachable("autoscaler", name, write=False) == (kind == "jobs"), name
    assert "&conduit:cancel" in user_rules(PREFIX, "engine") and "&conduit:keys-changed" not in \
        user_rules(PREFIX, "engine"), "engines hear cancellations; only key changes' writers announce them"
    assert [r for r in user_rules(PREFIX, "admin") if r.startswith("&")] == ["&conduit:keys-changed"]


def test_no_role_may_run_dangerous_commands_or_list_the_keyspace() -> None:
    for role in ROLES:
        rules = user_rules(PREFIX, role)
        assert rules.index("resetkeys") == 0 and "resetchannels" in rules and rules.count("-@all") == 1
        for denied in ("-@dangerous", "-@admin", "-scan", "-function", "-script|flush"):
            assert rules.index(denied) > rules.index("-@all"), f"{role}: {denied} is granted back afterwards"
        assert "~*" not in rules and "allkeys" not in rules and "&*" not in rules and "allcommands" not in rules
    assert set(ROLE_NAMES) == set(ROLES) and BASE_ROLES == ("gateway", "engine", "admin")


def test_the_file_has_a_placeholder_per_role_and_the_default_user_off() -> None:
    text = acl_file("p", ROLES)
    lines = [ln for ln in text.splitlines() if ln.startswith("user ")]
    # Off, no password: no client is ever it; the rest only for Redis's AOF replay (acl.DEFAULT_USER).
    assert lines[0] == "user default off resetpass ~* &* +@all -@admin -@dangerous"
    assert [ln.split()[1:4] for ln in lines[1:]] == [[r, "on", f"#{{REDIS_{r.upper()}_PASSWORD}}"] for r in ROLES]
    assert not re.search(r"#\{", "\n".join(ln for ln in text.splitlines() if not ln.startswith("user ")))
    assert acl_file("p", ROLES, {r: f"{r}-secret" for r in ROLES}).count(">") == len(ROLES)


def test_conduit_redis_acl_prints_the_file() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "redis-acl", "--key-prefix", "p", "--autoscaler"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == acl_file("p", ROLES)


def granted_after(rules: list[str], rule: str, *later: str) -> bool:
    """Whether ``rule`` is in ``rules`` and none of ``later`` comes after it (rules apply in order)."""
    return rule in rules and all(r not in rules[rules.index(rule) + 1:] for r in later)


def test_no_role_may_track_other_clients_keys() -> None:
    """``CLIENT TRACKING on BCAST`` would push the name of every key anyone modifies (API key ids,
    idempotency digests, tenants' limits); ``+@connection`` grants it unless taken back."""
    for role in ROLES:
        rules = user_rules(PREFIX, role)
        assert granted_after(rules, "-client|tracking", "+@connection", "+client", "+@all", "+client|tracking"), role


def test_the_autoscaler_may_log_in_and_read_stream_lengths_only() -> None:
    rules = user_rules(PREFIX, "autoscaler")
    assert "+@connection" not in rules and "+@read" not in rules
    assert [r for r in rules if r.startswith("+") and not r.startswith("+cluster|")] == \
        ["+hello", "+auth", "+ping", "+xlen"]


def test_engines_only_listen_on_the_cancel_channel() -> None:
    """A compromised GPU box must not cancel every tenant's jobs: engines subscribe, never publish."""
    rules = user_rules(PREFIX, "engine")
    for command in ("-publish", "-spublish"):
        assert granted_after(rules, command, "+@pubsub", "+publish", "+spublish", "+@all"), command


def test_only_the_admin_may_kill_a_runaway_script() -> None:
    for role in ROLES:
        rules = user_rules(PREFIX, role)
        assert granted_after(rules, "+script|kill", "-script|kill", "-@scripting", "-@all") == (role == "admin"), role
