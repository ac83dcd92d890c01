"""Redis ACL users, one per role, derived from the Redis names of :mod:`.keys`.

Each role may reach only the names its processes use, so a GPU box (its ``engine`` user) can
neither read nor write API key records, rate limits, usage, idempotency records or stored responses:

* ``gateway``: every name of :class:`~.keys.Keys` (it also serves ``/admin/keys``);
* ``engine``: the job path: job streams and keys, reply streams, result records, dead letters,
  the engine registry, fair queueing's lists and counters, the image store; the cancel channel
  (subscribe only: no ``PUBLISH``);
* ``admin``: what ``conduit keys`` uses: key records, their index and version (read and write),
  usage (read only); the keys-changed channel; ``SCRIPT KILL`` (a runaway script);
* ``autoscaler``: ``XLEN`` of the job streams, read only (KEDA's redis-streams trigger), and
  logging in (``HELLO``, ``AUTH``, ``PING``).

Patterns are the names themselves with ``*`` for each variable part (``Keys.jobs("*")`` is
``conduit:jobs:{*}``), so a renamed key moves its pattern with it, and :func:`name_patterns`
must name every member of :class:`~.keys.Keys` (``tests/unit/test_redis_acl.py``). Commands are
granted by category with the dangerous ones (``KEYS``, ``FLUSHALL``, ``CONFIG``, ``DEBUG``...),
keyspace listing (``SCAN``), key tracking (``CLIENT TRACKING``) and server-side functions taken
away; scripts run with the caller's rights (Redis checks each command a script calls against its
user).

:func:`acl_file` writes the users; ``conduit redis-acl`` prints it. The deployments check in its
output (``compose/redis/users.acl``, the ConfigMap in ``compose/kubernetes/redis.yaml``) with a
placeholder for each password, ``#{REDIS_<ROLE>_PASSWORD}``, which ``compose/redis/start.sh``
fills in with the SHA-256 of that environment variable when Redis starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.contract.keys import Keys

#: Every role, in the order its users are written.
ROLES = ("gateway", "engine", "admin", "autoscaler")
#: The roles a deployment without an autoscaler (docker compose) defines.
BASE_ROLES = ROLES[:3]

_ANY = "*"

#: A cluster's topology (redis-py's cluster client asks ``CLUSTER SLOTS``, and ``COMMAND``: @connection).
_TOPOLOGY = ("+cluster|slots", "+cluster|shards", "+cluster|nodes", "+cluster|info", "+cluster|myid")
#: Taken from every user last: server administration, listing the keyspace (``SCAN``, which key
#: patterns do not filter), server-side functions, other clients' scripts, and key tracking
#: (``CLIENT TRACKING on BCAST`` pushes the name of every key any client modifies, whatever the
#: user's key patterns: API key ids, idempotency digests, tenants' limits).
_NEVER = ("-@dangerous", "-@admin", "-scan", "-randomkey", "-function", "-fcall", "-fcall_ro", "-script|flush",
          "-script|kill", "-script|debug", "-client|tracking")
#: What a Conduit process needs: data commands, scripts (whose commands Redis checks against the
#: caller's keys), pub/sub, transactions (pipelines), the connection, ``TIME`` (scripts' clock).
_CLIENT = ("-@all", "+@read", "+@write", "+@scripting", "+@pubsub", "+@transaction", "+@connection", "+time",
           *_TOPOLOGY, *_NEVER)
#: Engines hear cancellations and never announce any: one that could publish on the cancel channel
#: could cancel every tenant's jobs.
_ENGINE = (*_CLIENT, "-publish", "-spublish")
#: ``conduit keys``' user is the operator's: it alone may stop a script that never returns
#: (``SCRIPT KILL``; scripts block every client while they run).
_ADMIN = (*_CLIENT, "+script|kill")
#: KEDA's redis-streams trigger: log in (``HELLO`` or ``AUTH``), ``PING``, ``XLEN``; nothing else
#: of ``@connection`` (``CLIENT ...``).
_AUTOSCALER = ("-@all", "+hello", "+auth", "+ping", "+xlen", *_TOPOLOGY, *_NEVER)


def name_patterns(keys: Keys) -> dict[str, tuple[str, ...]]:
    """Every Redis key name of ``keys`` as glob patterns, by the :class:`Keys` member that makes it."""
    return {
        "engines": (keys.engines,), "engine_info": (keys.engine_info,), "models_seen": (keys.models_seen,),
        "jobs": (keys.jobs(_ANY),), "engine_jobs": (keys.engine_jobs(_ANY, _ANY),), "job": (keys.job(_ANY, _ANY),),
        "replies": (keys.replies(_ANY),), "reply_generation": (keys.reply_generation(_ANY),), "result": (keys.result(_ANY),),
        "dead_letters": (keys.dead_letters(_ANY),),
        "wait": (keys.wait(_ANY, _ANY),), "ring": (keys.ring(_ANY),), "fair_state": (keys.fair_state(_ANY),),
        "weights": (keys.weights(_ANY),), "tenant_backlog": (keys.tenant_backlog(_ANY, _ANY),),
        "queued_bytes": (keys.queued_bytes(_ANY),), "queued_jobs": (keys.queued_jobs(_ANY),),
        "image": (keys.image(_ANY),),
        "api_key": (keys.api_key(_ANY),), "keys_index": (keys.keys_index,), "keys_version": (keys.keys_version,),
        "rate_limits": keys.rate_limits(_ANY), "usage": (keys.usage(_ANY, _ANY),),
        "idempotency": (keys.idempotency(_ANY, _ANY),), "idempotency_bytes": (keys.idempotency_bytes(_ANY),),
        "stored_response": (keys.stored_response(_ANY, _ANY),),
        "response_charged": (keys.response_charged(_ANY, _ANY),),
        "stored_response_ledger": keys.stored_response_ledger(_ANY),
    }


def channels(keys: Keys) -> dict[str, str]:
    """Every Pub/Sub channel of ``keys``, by its :class:`Keys` member."""
    return {"cancel_channel": keys.cancel_channel, "keys_changed": keys.keys_changed}


#: :class:`Keys` members that name nothing of their own (a part of another name).
HELPERS = frozenset({"prefix", "wait_prefix"})


@dataclass(frozen=True)
class Role:
    """What one role's user may touch: names it reads and writes, names it only reads, channels."""

    read_write: tuple[str, ...]
    read: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    commands: tuple[str, ...] = _CLIENT


#: Every name: the gateway's (it also serves ``/admin/keys``).
_EVERY_NAME = tuple(name_patterns(Keys()))
#: The engines': the job path and nothing of API keys.
_JOB_PATH = ("jobs", "engine_jobs", "job", "replies", "reply_generation", "result", "dead_letters", "engines", "engine_info",
             "models_seen", "wait", "ring", "fair_state", "weights", "tenant_backlog", "queued_bytes", "queued_jobs",
             "image")

#: Each role's names (members of :class:`Keys`, see :func:`name_patterns`).
ROLE_NAMES: dict[str, Role] = {
    "gateway": Role(read_write=_EVERY_NAME, channels=("cancel_channel", "keys_changed")),
    "engine": Role(read_write=_JOB_PATH, channels=("cancel_channel",), commands=_ENGINE),
    "admin": Role(read_write=("api_key", "keys_index", "keys_version"), read=("usage",), channels=("keys_changed",),
                  commands=_ADMIN),
    "autoscaler": Role(read_write=(), read=("jobs",), commands=_AUTOSCALER),
}


def password_variable(role: str) -> str:
    """The environment variable holding ``role``'s password where Redis starts (``REDIS_ENGINE_PASSWORD``)."""
    return f"REDIS_{role.upper()}_PASSWORD"


def user_rules(prefix: str, role: str) -> list[str]:
    """``role``'s ACL rules for the key prefix ``prefix`` (everything after ``user NAME on PASSWORD``)."""
    keys, spec = Keys(prefix), ROLE_NAMES[role]
    patterns = name_patterns(keys)
    out = ["resetkeys", *(f"~{p}" for name in spec.read_write for p in patterns[name]),
           *(f"%R~{p}" for name in spec.read for p in patterns[name]), "resetchannels"]
    out += [f"&{channels(keys)[name]}" for name in spec.channels]
    return out + list(spec.commands)


def acl_user(prefix: str, role: str, password: str | None = None) -> str:
    """One ``user`` line: with ``password`` in clear (``>...``, tests), else its placeholder
    ``#{REDIS_<ROLE>_PASSWORD}`` for ``compose/redis/start.sh`` to fill in."""
    secret = f">{password}" if password is not None else f"#{{{password_variable(role)}}}"
    return " ".join(["user", role, "on", secret, *user_rules(prefix, role)])


#: Off, without a password; its permissions only ever apply to Redis's own AOF replay (see
#: :func:`acl_file`): every write the roles' scripts make, and no admin or dangerous command, so a
#: connection that was the default user before it was switched off (``ACL SETUSER`` on a live
#: Redis) cannot reconfigure Redis or turn the user back on.
DEFAULT_USER = "user default off resetpass ~* &* +@all -@admin -@dangerous"


def acl_file(prefix: str = "conduit", roles: tuple[str, ...] = BASE_ROLES,
             passwords: dict[str, str] | None = None) -> str:
    """The users of ``roles`` (and the default user off) as Redis configuration lines."""
    command = f"conduit redis-acl --key-prefix {prefix}{' --autoscaler' if 'autoscaler' in roles else ''}"
    head = [f"# Conduit's Redis users for the key prefix {prefix!r}: written by `{command}`",
            "# (engines/contract/acl.py) from the key names; regenerate it, never edit it. Redis configuration",
            "# lines: each password placeholder (a hash sign, the variable's name in braces) becomes the SHA-256",
            "# of that environment variable's value when Redis starts (compose/redis/start.sh). The default user is",
            "# off (no connection is it, none can log in as it) but keeps every permission: Redis up to 8.2 replays",
            "# the AOF's transactions as that user and silently drops them if it may not (redis/redis#14541).",
            DEFAULT_USER]
    return "\n".join([*head, *(acl_user(prefix, r, (passwords or {}).get(r)) for r in roles)]) + "\n"
