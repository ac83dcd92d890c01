"""Conduit as the Redis users a deployment gives it: Redis started by the shipped
``compose/redis/start.sh`` with the shipped ``compose/redis/users.acl`` (key prefix ``conduit``).

A gateway, an engine and ``conduit keys`` each run as their role; every flow they share must go
through without one refused command (Redis's ``ACL LOG``, read by a test-only ``root`` user, stays
empty: a refusal a retry loop swallowed would show there), while an engine's user is refused key
records, usage, limits and idempotency records (NOPERM). TLS: the same over ``rediss://`` with a
throwaway CA.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from engines.contract.acl import ROLES, password_variable
from engines.contract.keys import Keys
from gateway.stack import wait_for_port
from gateway.tenancy.keys import HASHER, KeyStore
from tests.harness import ROOT, Proc, Stack, free_port

START = ROOT / "compose" / "redis" / "start.sh"
PASSWORDS = {role: f"{role}-password-{os.urandom(8).hex()}" for role in ROLES}
ROOT_PASSWORD = "root-of-this-test-only-0123456789"
ADMIN, METRICS = "admin-credential-0123456789abcdef", "metrics-credential-0123456789abcdef"
CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class AclRedis:
    """redis-server as a deployment starts it (``start.sh``, passwords in the environment), on a
    free port, plus a ``root`` user of the test's own to read ``ACL LOG``."""

    def __init__(self, workdir: Path, *options: str, users: Path | None = None, ca: Path | None = None) -> None:
        self.port = free_port()
        #: TLS only (``--port 0 --tls-port``) when ``ca`` is given: clients verify the server with it.
        self.scheme, self.query = ("rediss", f"?ssl_ca_certs={ca}") if ca else ("redis", "")
        env = {"PATH": os.environ["PATH"], **{password_variable(r): p for r, p in PASSWORDS.items()}}
        if users is not None:
            env["CONDUIT_REDIS_USERS"] = str(users)
        self.proc = Proc(["sh", str(START), "--tls-port" if ca else "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(workdir), *options,
                          "--user", "root", "on", f">{ROOT_PASSWORD}", "~*", "&*", "+@all"],
                         workdir / "redis.log", env)
        wait_for_port(self.port, proc=self.proc.proc, timeout=10)

    def url(self, role: str | None = None) -> str:
        """The URL of this Redis, as ``role`` (in the URL) or without a user (given apart)."""
        user = f"{role}:{PASSWORDS.get(role, ROOT_PASSWORD)}@" if role else ""
        return f"{self.scheme}://{user}127.0.0.1:{self.port}/0{self.query}"

    def root(self) -> redis.Redis:
        return redis.Redis.from_url(self.url("root"), decode_responses=True)

    def refusals(self) -> list[str]:
        with self.root() as r:
            return [f"{e['username']}: {e['reason']} {e['object']} ({e['context']})" for e in r.acl_log()]

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path)
    yield server
    server.stop()


def as_role(role: str) -> dict[str, str]:
    """The environment a role's process gets in compose and Kubernetes: user and password apart
    from the URL."""
    return {"CONDUIT_REDIS_USERNAME": role, "CONDUIT_REDIS_PASSWORD": PASSWORDS[role]}


def keys_cli(server: AclRedis, *args: str) -> subprocess.CompletedProcess[str]:
    """``conduit keys ...`` as the admin user."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", "keys", *args, "--redis-url", server.url(),
                           "--key-prefix", "conduit"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **as_role("admin")})


def test_redis_does_not_start_without_a_password_for_every_user(tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], **{password_variable(r): p for r, p in PASSWORDS.items()}}
    for missing, value in (("REDIS_ENGINE_PASSWORD", None), ("REDIS_GATEWAY_PASSWORD", ""),
                           ("REDIS_ADMIN_PASSWORD", "short")):
        env = {k: v for k, v in base.items() if k != missing} | ({} if value is None else {missing: value})
        done = subprocess.run(["sh", str(START), "--port", str(free_port())], env=env, capture_output=True,
                              text=True, timeout=10)
        assert done.returncode == 1 and missing in done.stderr, done.stderr
        assert "short" not in done.stderr.replace("shorter", ""), "a password is never echoed"


def test_no_password_is_on_the_redis_command_line(acl_redis: AclRedis) -> None:
    cmdline = Path(f"/proc/{acl_redis.proc.proc.pid}/cmdline").read_bytes().decode()
    assert cmdline.startswith("redis-server"), cmdline  # start.sh exec'd it: one process, signals reach it
    for role in ("gateway", "engine", "admin"):
        assert PASSWORDS[role] not in cmdline
    with redis.Redis(port=acl_redis.port, protocol=2, retry=Retry(NoBackoff(), 0)) as anonymous, \
            pytest.raises(redis.AuthenticationError):
        anonymous.ping()  # the default user is off


def test_a_stack_runs_as_its_redis_users_and_nothing_is_refused(acl_redis: AclRedis, tmp_path: Path) -> None:
    stack = Stack(acl_redis.url(), tmp_path)
    stack.prefix = "conduit"  # the shipped users' prefix (this Redis is the test's own)
    try:
        stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), metrics_auth=True,
                      metrics_key_hash=HASHER.hash(METRICS), **{k.removeprefix("CONDUIT_").lower(): v
                                                                 for k, v in as_role("gateway").items()})
        stack.engine("--kind", "synthetic", "--served-name", "synthetic", "--max-concurrency", "1",
                     "--token-delay", "0.02", "--metrics-port", str(free_port()), wait=False, env=as_role("engine"))
        made = keys_cli(acl_redis, "create", "--name", "acl", "--rpm", "1000", "--tpm", "100000")
        assert made.returncode == 0, made.stderr
        stack.api_key = key = made.stdout.strip()
        stack.wait_for_model("synthetic", stack.procs[-1])
        headers = {"Authorization": f"Bearer {key}"}
        url = f"{stack.base_url}/v1/chat/completions"

        client = stack.sdk()
        assert client.chat.completions.create(**CHAT).choices[0].message.content == "tok " * 4  # type: ignore[call-overload]
        streamed = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "tok " * 4
        assert [c.text for c in client.completions.create(model="synthetic", prompt="a", max_tokens=2, n=2).choices] \
            == ["tok tok ", "tok tok "]
        # One slot, four requests at once: three wait in the key's list until the engine promotes them.
        with cf.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: httpx.post(url, json=CHAT, headers=headers, timeout=30), range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        # A replayed Idempotency-Key; a client that hangs up (the engine hears the cancellation).
        first, again = (httpx.post(url, json=CHAT, headers={**headers, "Idempotency-Key": "acl-1"}, timeout=30)
                        for _ in range(2))
        assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
        with httpx.stream("POST", url, json={**CHAT, "max_tokens": 200, "stream": True}, headers=headers,
                          timeout=30) as r:
            next(r.iter_lines())
        # The admin API writes key records through the gateway's user; Prometheus's credential reads /metrics.
        admin = {"Authorization": f"Bearer {ADMIN}"}
        created = httpx.post(f"{stack.base_url}/admin/keys", json={"name": "via-api"}, headers=admin)
        assert created.status_code == 201, created.text
        assert httpx.get(f"{stack.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS}"}).status_code == 200
        assert httpx.get(f"{stack.base_url}/metrics", headers=admin).status_code == 401
        # `conduit keys` as admin: usage (written by the gateway once a second), list, revoke.
        key_id = key.split("-")[1]
        deadline = time.monotonic() + 10
        while '"requests"' not in (usage := keys_cli(acl_redis, "usage", key_id, "--json")).stdout:
            assert usage.returncode == 0 and time.monotonic() < deadline, usage.stderr
            time.sleep(0.3)
        listed = keys_cli(acl_redis, "list")
        assert listed.returncode == 0 and "via-api" in listed.stdout, listed.stderr
        assert keys_cli(acl_redis, "revoke", key_id).returncode == 0
        deadline = time.monotonic() + 5
        while httpx.get(f"{stack.base_url}/v1/models", headers=headers).status_code != 401:
            assert time.monotonic() < deadline, "the revocation never reached the gateway"
            time.sleep(0.05)
        time.sleep(1.5)  # heartbeats, registry refreshes, reclaim scans, usage flushes: a few more turns
    finally:
        stack.stop()
    assert acl_redis.refusals() == [], "a Conduit process was refused a command it needs"
    logs = "".join(p.output() for p in stack.procs)
    assert "NOPERM" not in logs and "no permissions" not in logs, logs[-3000:]


def test_an_engine_is_refused_key_records_usage_limits_and_idempotency(acl_redis: AclRedis) -> None:
    keys = Keys("conduit")
    with redis.Redis(port=acl_redis.port, username="engine", password=PASSWORDS["engine"]) as engine:
        for command in (("SET", keys.api_key("0123456789ab"), "x"), ("GET", keys.api_key("0123456789ab")),
                        ("SADD", keys.keys_index, "x"), ("INCR", keys.keys_version),
                        ("HINCRBY", keys.usage("0123456789ab", "20261206"), "m|requests", 1),
                        ("HGETALL", keys.usage("0123456789ab", "20261206")),
                        ("HINCRBY", keys.rate_limits("0123456789ab")[0], "1", 1),
                        ("SET", keys.idempotency("0123456789ab", "f" * 64), "x"),
                        ("PUBLISH", keys.keys_changed, "1"), ("SET", "other-app:key", "x"),
                        ("KEYS", "*"), ("SCAN", "0"), ("FLUSHALL",), ("CONFIG", "GET", "*")):
            with pytest.raises(NoPermissionError):
                engine.execute_command(*command)
        # ... while the names it does use all take its writes.
        for command in (("XADD", keys.jobs("m"), "*", "a", "1"), ("XADD", keys.engine_jobs("m", "e"), "*", "a", "1"),
                        ("SET", keys.job("m", "j"), "o", "PX", 1000), ("XADD", keys.result("j"), "*", "a", "1"),
                        ("XADD", keys.dead_letters("m"), "*", "a", "1"), ("XADD", keys.replies("g"), "*", "a", "1"),
                        ("ZADD", keys.engines, 1, "e"), ("HSET", keys.engine_info, "e", "x"),
                        ("HSET", keys.models_seen, "m", 1), ("RPUSH", keys.wait("m", "t"), "j"),
                        ("RPUSH", keys.ring("m"), "t"), ("HINCRBY", keys.fair_state("m"), "waiting", 1),
                        ("HSET", keys.weights("m"), "t", 1), ("ZADD", keys.tenant_backlog("m", "t"), 1, "j"),
                        ("HINCRBY", keys.queued_bytes("m"), "total", 1), ("ZADD", keys.queued_jobs("m"), 1, "j"),
                        ("SET", keys.image("img_x.png"), "x", "PX", 1000), ("XLEN", keys.jobs("m"))):
            engine.execute_command(*command)

    async def key_record_as(role: str) -> None:
        client = aioredis.Redis(port=acl_redis.port, username=role, password=PASSWORDS[role])
        try:
            await KeyStore(client, keys).create("k")  # the real script: record, index, version, publish
        finally:
            await client.aclose()

    with pytest.raises(NoPermissionError):
        asyncio.run(key_record_as("engine"))
    asyncio.run(key_record_as("admin"))
    with redis.Redis(port=acl_redis.port, username="admin", password=PASSWORDS["admin"]) as admin:
        admin.hgetall(keys.usage("0123456789ab", "20261206"))
        for command in (("HINCRBY", keys.usage("0123456789ab", "20261206"), "m|requests", 1),
                        ("XADD", keys.jobs("m"), "*", "a", "1"), ("GET", keys.image("img_x.png"))):
            with pytest.raises(NoPermissionError):
                admin.execute_command(*command)


def kubernetes_redis(tmp_path: Path) -> AclRedis:
    """Redis with Kubernetes' users (KEDA's too), from the ConfigMap in compose/kubernetes/redis.yaml."""
    import yaml

    [config] = [d for d in yaml.safe_load_all((ROOT / "compose/kubernetes/redis.yaml").read_text())
                if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "redis-users"]
    users = tmp_path / "users.acl"
    users.write_text(config["data"]["users.acl"])
    return AclRedis(tmp_path, users=users)


def test_the_autoscaler_reads_only_job_stream_lengths(tmp_path: Path) -> None:
    """Kubernetes' users (KEDA's too), from the ConfigMap in compose/kubernetes/redis.yaml."""
    server = kubernetes_redis(tmp_path)
    try:
        keys = Keys("conduit")
        with redis.Redis(port=server.port, username="autoscaler", password=PASSWORDS["autoscaler"]) as scaler:
            assert scaler.xlen(keys.jobs("llama-3.1-8b")) == 0
            for command in (("XRANGE", keys.jobs("m"), "-", "+"), ("XADD", keys.jobs("m"), "*", "a", "1"),
                            ("GET", keys.api_key("0123456789ab")), ("XLEN", keys.replies("g"))):
                with pytest.raises(NoPermissionError):
                    scaler.execute_command(*command)
    finally:
        server.stop()


def test_no_user_may_track_the_keys_others_modify(tmp_path: Path) -> None:
    """``CLIENT TRACKING on BCAST`` (RESP3) would push the name of every key any client modifies:
    API key ids, idempotency digests, tenants' limits. Every user logs in over RESP3 and is refused."""
    (tmp_path / "compose").mkdir()
    compose, kubernetes = AclRedis(tmp_path / "compose"), None
    try:
        kubernetes = kubernetes_redis(tmp_path)
        for server, roles in ((compose, ("gateway", "engine", "admin")), (kubernetes, ROLES)):
            for role in roles:
                with redis.Redis(port=server.port, username=role, password=PASSWORDS[role], protocol=3,
                                 retry=Retry(NoBackoff(), 0)) as client:
                    assert client.ping()
                    with pytest.raises(NoPermissionError):
                        client.execute_command("CLIENT", "TRACKING", "on", "BCAST")
                    with pytest.raises(NoPermissionError):
                        client.execute_command("CLIENT", "TRACKING", "on")
    finally:
        compose.stop()
        if kubernetes is not None:
            kubernetes.stop()


def test_an_engine_may_hear_cancellations_but_not_send_them(acl_redis: AclRedis) -> None:
    """A compromised GPU box publishing on the cancel channel would cancel every tenant's jobs."""
    keys = Keys("conduit")
    with redis.Redis(port=acl_redis.port, username="engine", password=PASSWORDS["engine"]) as engine:
        for command in ("PUBLISH", "SPUBLISH"):
            with pytest.raises(NoPermissionError):
                engine.execute_command(command, keys.cancel_channel, "job-1 0")
        with engine.pubsub() as listening:
            listening.subscribe(keys.cancel_channel)
            assert listening.get_message(timeout=5)["type"] == "subscribe"
    with redis.Redis(port=acl_redis.port, username="gateway", password=PASSWORDS["gateway"]) as gateway:
        gateway.publish(keys.cancel_channel, "job-1 0")


def test_the_admin_may_kill_a_runaway_script(acl_redis: AclRedis) -> None:
    """Scripts run as their caller, but one that never returns blocks every client: ``conduit
    keys``' user (the operator's) may stop it; no other user may kill another's script."""
    with acl_redis.root() as root:
        root.config_set("busy-reply-threshold", 100)
    admin = redis.Redis(port=acl_redis.port, username="admin", password=PASSWORDS["admin"],
                        retry=Retry(NoBackoff(), 0))
    gateway = redis.Redis(port=acl_redis.port, username="gateway", password=PASSWORDS["gateway"],
                          retry=Retry(NoBackoff(), 0))
    admin.ping(), gateway.ping()  # connected before Redis turns busy
    engine = redis.Redis(port=acl_redis.port, username="engine", password=PASSWORDS["engine"], socket_timeout=30)
    with cf.ThreadPoolExecutor(1) as pool:
        loop = pool.submit(engine.eval, "while true do end", 0)
        try:
            time.sleep(0.5)
            with pytest.raises(NoPermissionError):
                gateway.script_kill()
            admin.script_kill()
            with pytest.raises(redis.ResponseError, match="killed"):
                loop.result(timeout=20)
        finally:
            if not loop.done():
                with acl_redis.root() as root:
                    root.script_kill()
    for client in (admin, gateway, engine):
        client.close()


def test_redis_refuses_a_password_with_a_newline(tmp_path: Path) -> None:
    """A secret made from a file often ends in a newline, which ``$(...)`` would silently strip:
    Redis would hold the digest of a password no client sends. start.sh refuses it by name."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "redis-server").write_text("#!/bin/sh\necho started\ncat >/dev/null\n")
    (fake / "redis-server").chmod(0o755)
    base = {"PATH": f"{fake}:{os.environ['PATH']}", **{password_variable(r): p for r, p in PASSWORDS.items()}}
    started = subprocess.run(["sh", str(START)], env=base, capture_output=True, text=True, timeout=10)
    assert started.returncode == 0 and started.stdout == "started\n", started.stderr  # the fake Redis
    for value in (PASSWORDS["engine"] + "\n", PASSWORDS["engine"] + "\n\n", "a\n" + PASSWORDS["engine"]):
        done = subprocess.run(["sh", str(START)], env={**base, "REDIS_ENGINE_PASSWORD": value}, capture_output=True,
                              text=True, timeout=10)
        assert done.returncode == 1 and "REDIS_ENGINE_PASSWORD" in done.stderr and "newline" in done.stderr, \
            (value, done.stdout, done.stderr)
        assert PASSWORDS["engine"] not in done.stderr, "a password is never echoed"


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    out = {name: directory / name for name in ("ca.key", "ca.crt", "redis.key", "redis.csr", "redis.crt")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(out["ca.key"]), "-out", str(out["ca.crt"]),
        "-days", "1", "-subj", "/CN=conduit-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(out["redis.key"]), "-out", str(out["redis.csr"]),
        "-subj", "/CN=redis")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(out["redis.csr"]), "-CA", str(out["ca.crt"]), "-CAkey", str(out["ca.key"]),
        "-CAcreateserial", "-out", str(out["redis.crt"]), "-days", "1", "-extfile", str(directory / "san.ext"))
    return out


def test_gateway_and_engine_speak_tls_to_redis_with_a_ca_file(tmp_path: Path) -> None:
    """``rediss://user:password@host/0?ssl_ca_certs=ca.crt``, as compose/redis-tls.yml gives them
    (users in the URL here): the server's certificate is checked against the CA, and a client
    without the CA is refused."""
    tls = make_certificates(tmp_path)
    server = AclRedis(tmp_path, "--port", "0", "--tls-cert-file", str(tls["redis.crt"]), "--tls-key-file",
                      str(tls["redis.key"]), "--tls-ca-cert-file", str(tls["ca.crt"]), "--tls-auth-clients", "no",
                      ca=tls["ca.crt"])
    stack = Stack(server.url(), tmp_path)
    stack.prefix = "conduit"
    try:
        with redis.Redis.from_url(server.url("engine").partition("?")[0], socket_timeout=5,
                                  retry=Retry(NoBackoff(), 0)) as unverified, \
                pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            unverified.ping()
        stack.gateway(redis_url=server.url("gateway"))
        stack.synthetic("synthetic", redis_url=server.url("engine"))
        client = stack.sdk()
        assert client.chat.completions.create(**CHAT).choices[0].message.content == "tok " * 4  # type: ignore[call-overload]
        streamed = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "tok " * 4
        assert server.refusals() == []
    finally:
        stack.stop()
        server.stop()


def test_keys_and_the_queue_survive_a_redis_restart_from_its_aof(tmp_path: Path) -> None:
    """Key records are written in MULTI/EXEC (Lua scripts replicate as transactions). Redis before
    the fix of redis/redis#14541 (7.0 to 8.2) re-checks EXEC's ACL as the default user while it
    replays the AOF: with that user's permissions reset, every transaction is dropped silently and
    a restart loses every key (and the queue's writes). The shipped default user is off (nobody can
    log in as it) but keeps the permissions those writes need, so the replay keeps them."""
    keys = Keys("conduit")
    jobs, job = keys.jobs("m"), keys.job("m", "j1")
    server = AclRedis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        made = keys_cli(server, "create", "--name", "durable", "--rpm", "60")
        assert made.returncode == 0, made.stderr
        key_id = made.stdout.strip().split("-")[1]
        # What the queue's scripts do, as one transaction: Redis propagates its effects (XREADGROUP
        # as XCLAIM and XGROUP SETID, SET PX as PXAT...), which the replay must be allowed to run.
        with redis.Redis(port=server.port, username="engine", password=PASSWORDS["engine"]) as engine:
            engine.xgroup_create(jobs, "engines", id="0", mkstream=True)
            with engine.pipeline(transaction=True) as tx:
                for i in range(3):
                    tx.xadd(jobs, {"job": f"j{i}"})
                tx.set(job, "q", px=600_000).hincrby(keys.fair_state("m"), "waiting", 2)
                tx.zadd(keys.queued_jobs("m"), {"j1": 1}).rpush(keys.wait("m", "t"), "j2")
                tx.xreadgroup("engines", "e1", {jobs: ">"}, count=2).execute()
            first = engine.xrange(jobs)[0][0]
            with engine.pipeline(transaction=True) as tx:
                tx.xack(jobs, "engines", first).xdel(jobs, first).lpop(keys.wait("m", "t")).execute()
            state = (engine.xlen(jobs), engine.xpending(jobs, "engines")["pending"], engine.get(job),
                     engine.hget(keys.fair_state("m"), "waiting"), engine.llen(keys.wait("m", "t")))
    finally:
        server.stop()
    again = AclRedis(tmp_path, "--appendonly", "yes")
    try:
        listed = keys_cli(again, "list")
        assert listed.returncode == 0 and "durable" in listed.stdout and key_id in listed.stdout, listed.stdout
        with redis.Redis(port=again.port, username="engine", password=PASSWORDS["engine"]) as engine:
            assert (engine.xlen(jobs), engine.xpending(jobs, "engines")["pending"], engine.get(job),
                    engine.hget(keys.fair_state("m"), "waiting"), engine.llen(keys.wait("m", "t"))) == state
            assert state == (2, 1, b"q", b"2", 0)
        log = (tmp_path / "redis.log").read_text()
        assert "NOPERM" not in log and "AOF-loading" not in log, log[-2000:]
        with pytest.raises(redis.AuthenticationError), \
                redis.Redis(port=again.port, protocol=2, retry=Retry(NoBackoff(), 0)) as anonymous:
            anonymous.ping()  # the default user is still off
    finally:
        again.stop()
