"""The core scenarios on a real Redis Cluster (3 masters + 3 replicas): every script, pipeline
and blocking read stays within one slot, and models spread over the masters."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from engines.contract.acl import user_rules
from engines.contract.keys import Keys
from tests.cluster import LocalCluster
from tests.harness import Stack
from tests.integration.test_telemetry import scrape, value

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def models_on_different_masters(cluster: LocalCluster, prefix: str) -> tuple[str, str]:
    """Two model names whose job streams live on different masters."""
    keys = Keys(prefix)
    first = "alpha"
    for i in range(100):
        other = f"beta{i}"
        if cluster.master_for_key(keys.jobs(other)).port != cluster.master_for_key(keys.jobs(first)).port:
            return first, other
    raise AssertionError("no second master found")


def chat_and_stream(client: openai.OpenAI, model: str) -> None:
    """One answer and one stream of ``model`` (a synthetic engine's tokens), checked."""
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content == "tok " * 3
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 4


@pytest.fixture
def cluster_stack(redis_cluster: LocalCluster, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(redis_cluster.conduit_url, tmp_path)
    yield s
    s.stop()


def test_chat_and_completions_on_a_cluster(cluster_stack: Stack, redis_cluster: LocalCluster) -> None:
    stack = cluster_stack
    alpha, beta = models_on_different_masters(redis_cluster, stack.prefix)
    stack.gateway()
    stack.synthetic(f"{alpha},{beta}", "--token-delay", "0.01")  # one engine, two masters' streams
    stack.wait_for_model(beta)
    client = stack.sdk()
    assert sorted(m.id for m in client.models.list()) == sorted([alpha, beta])
    for model in (alpha, beta):
        chat_and_stream(client, model)
        c = client.completions.create(model=model, prompt="a b", max_tokens=2, n=2)
        assert [ch.text for ch in c.choices] == ["tok tok ", "tok tok "]


def test_an_engine_killed_on_a_cluster_has_its_job_retried(cluster_stack: Stack) -> None:
    stack = cluster_stack
    stack.gateway()
    doomed = stack.synthetic("alpha", "--token-delay", "0.2", "--tokens", "8", "--reclaim-idle-ms", "1000")
    box: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: box.update(r=httpx.post(
        f"{stack.base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=30)))
    t.start()
    time.sleep(0.8)
    doomed.kill()
    stack.synthetic("alpha", "--reclaim-idle-ms", "1000")
    t.join(30)
    assert box["r"].status_code == 200, box["r"].text
    assert box["r"].json()["choices"][0]["message"]["content"] == "tok " * 8


def test_a_client_that_leaves_cancels_its_job_on_a_cluster(cluster_stack: Stack) -> None:
    """Cancellation travels by Pub/Sub, which a cluster broadcasts to every node."""
    from tests.harness import free_port
    from tests.integration.test_delivery import wait_for_jobs

    stack = cluster_stack
    metrics_port = free_port()
    stack.gateway()
    stack.synthetic("alpha", "--token-delay", "0.2", "--tokens", "50", "--metrics-port", str(metrics_port))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 50}, timeout=1.0)
    assert wait_for_jobs(metrics_port, "cancelled", 1).get("cancelled") == 1


def test_every_key_a_request_touches_shares_its_models_slot(cluster_stack: Stack,
                                                           redis_cluster: LocalCluster) -> None:
    """A streamed answer mid-flight: the job stream and the job key sit on one master."""
    stack = cluster_stack
    stack.gateway()
    stack.synthetic("alpha", "--token-delay", "0.1", "--tokens", "10")
    keys = Keys(stack.prefix)
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions",
                      json={**CHAT, "max_tokens": 10, "stream": True}, timeout=30) as s:
        lines = s.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        job_id = first["id"]
        assert redis_cluster.master_for_key(keys.job("alpha", job_id)).port == \
            redis_cluster.master_for_key(keys.jobs("alpha")).port
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"


def test_gateway_and_engine_run_as_their_redis_users_on_a_cluster(cluster_stack: Stack,
                                                                  redis_cluster: LocalCluster) -> None:
    """The users of engines/contract/acl.py (this stack's prefix), defined on every node as a
    deployment would: the cluster client logs in to each node it finds, and nothing either side
    does on a cluster (CLUSTER SLOTS, COMMAND, each slot's scripts, Pub/Sub) is refused."""
    stack = cluster_stack
    alpha, beta = models_on_different_masters(redis_cluster, stack.prefix)
    users = {role: (f"{role}-{stack.prefix}", f"{role}-password-{stack.prefix}") for role in ("gateway", "engine")}
    nodes = [n for n in redis_cluster.nodes if n.alive()]
    for node in nodes:
        with node.client() as c:
            c.execute_command("ACL", "LOG", "RESET")
            for role, (name, password) in users.items():
                c.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *user_rules(stack.prefix, role))
    try:
        name, password = users["gateway"]
        stack.gateway(redis_username=name, redis_password=password)
        name, password = users["engine"]
        stack.engine("--kind", "synthetic", "--served-name", f"{alpha},{beta}", "--token-delay", "0.01",
                     "--tokens", "200", model=beta, env={"CONDUIT_REDIS_USERNAME": name, "CONDUIT_REDIS_PASSWORD": password})
        client = stack.sdk()
        for model in (alpha, beta):
            chat_and_stream(client, model)
        with pytest.raises(httpx.ReadTimeout):  # a client that leaves: the cancellation goes out by Pub/Sub
            httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 500}, timeout=0.5)
        time.sleep(1.5)  # heartbeats, registry refreshes, reclaim scans
        keys = Keys(stack.prefix)
        for model in (alpha, beta):  # both sides are logged in to both models' masters as their users
            with redis_cluster.master_for_key(keys.jobs(model)).client() as c:
                assert {n for n, _ in users.values()} <= {e["user"] for e in c.client_list()}
        stack.stop()
        refused = []
        for node in nodes:
            with node.client() as c:
                refused += [f"{node.port} {e['username']}: {e['reason']} {e['object']}" for e in c.acl_log()
                            if e["username"] in {n for n, _ in users.values()}]
        assert refused == []
    finally:
        for node in nodes:
            with node.client() as c:
                c.execute_command("ACL", "DELUSER", *(n for n, _ in users.values()))


def test_a_cold_model_on_a_cluster_waits_then_is_served_or_withdrawn(cluster_stack: Stack,
                                                                     redis_cluster: LocalCluster) -> None:
    """The cold path's scripts (submit, withdraw, promote) each stay in the model's slot."""
    stack = cluster_stack
    stack.gateway(models="alpha", cold_start_timeout_s=1, retry_after_s=4)
    late = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)  # no engine: withdrawn
    assert late.status_code == 503 and late.headers["retry-after"] == "4", late.text
    stack.gateway(models="alpha", cold_start_timeout_s=30)  # (a second gateway; it waits long enough)
    box: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: box.update(r=httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)))
    t.start()
    deadline = time.monotonic() + 10  # it waits cold (counted as such) until an engine starts
    while value(scrape(f"{stack.base_url}/metrics"), "conduit_gateway_requests_cold", gen_ai_request_model="alpha") != 1:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.05)
    stack.synthetic("alpha", "--token-delay", "0.01")
    t.join(30)
    assert box["r"].status_code == 200, box["r"].text
    assert box["r"].json()["choices"][0]["message"]["content"] == "tok " * 3
