"""Background responses through keyed gateway processes on one Redis and synthetic engines: queued at
once and polled from another gateway with the `openai` SDK (every body validated against OpenAI's
schemas); completed after ``kill -9`` of the gateway that accepted it, and after ``kill -9`` of its
engine (another engine runs it again); a streamed one resumed on another gateway with
``starting_after``: no gap, no duplicate; cancelled from another gateway; another key sees none of it.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from engines.contract.keys import Keys
from engines.contract.messages import Codec, Done, Failed

from gateway.tenancy.keys import parse_key
from tests.harness import RedisServer, Stack
from tests.keyed import KeyedGateways
from tests.openai_schema import validate_response, validate_response_stream

ADMIN = "responses-background-admin-credential-0123456789"
FAST, SLOW = "bg-fast", "bg-slow"
TOKENS = 40
#: Engines that number their tokens (so the text shows each one once, in order) and whose jobs are
#: reclaimed 2 s after their engine dies.
NUMBERED = ("--numbered", "--reclaim-idle-ms", "2000")
WHOLE = "".join(f"{i} " for i in range(TOKENS))


@pytest.fixture(scope="module")
def gws(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedGateways]:
    """Two keyed gateways (``urls[0]`` is killed and replaced by tests) and an engine."""
    g = KeyedGateways(Stack(redis_server.url, tmp_path_factory.mktemp("responses-background")), ADMIN)
    g.stack.api_key = g.key()  # (what the stack reads /v1/models with)
    g.stack.synthetic(FAST, *NUMBERED, "--tokens", "4")
    yield g
    g.close()


def raw(url: str, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{url}/v1/responses{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=30, **kwargs)


def poll(get: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 60) -> Any:
    """``get()`` until ``done`` says so (every answer must be a valid response)."""
    deadline = time.monotonic() + timeout
    while True:
        r = get()
        assert r.status_code == 200, r.text
        body = r.json()
        validate_response(body)
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def text_of(body: dict[str, Any]) -> str:
    return "".join(p["text"] for item in body["output"] if item["type"] == "message" for p in item["content"])


def sse(lines: Iterator[str], stop_after: int | None = None) -> list[dict[str, Any]]:
    """The events of a response stream (the first ``stop_after`` only, if given)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if stop_after is not None and len(events) == stop_after:
                break
    return events


def test_queued_at_once_then_polled_from_another_gateway(gws: KeyedGateways) -> None:
    key = gws.key()
    queued = gws.sdk(gws.urls[0], key).responses.create(model=FAST, input="Hello there", background=True)
    assert queued.status == "queued" and queued.background and queued.output == []
    validate_response(raw(gws.urls[0], key, "GET", f"/{queued.id}").json())
    done = poll(lambda: raw(gws.urls[1], key, "GET", f"/{queued.id}"), lambda b: b["status"] == "completed")
    assert text_of(done) == "0 1 2 3 " and done["usage"]["output_tokens"] == 4 and done["background"]
    retrieved = gws.sdk(gws.urls[1], key).responses.retrieve(queued.id)
    assert (retrieved.status, retrieved.output_text, retrieved.created_at) == ("completed", "0 1 2 3 ",
                                                                               queued.created_at)
    # Ended: its events are kept response_events_keep_s (10 min) from now, not past its deadline.
    r = redis.Redis.from_url(gws.stack.redis_url)
    assert 0 < r.pttl(Keys(gws.stack.prefix).result(queued.id)) <= 600_000
    r.close()
    # Continued like any stored response, and its input items kept.
    after = gws.sdk(gws.urls[1], key).responses.create(model=FAST, input="More", previous_response_id=queued.id)
    assert after.status == "completed"
    assert [i.type for i in gws.sdk(gws.urls[0], key).responses.input_items.list(after.id, order="asc")] == [
        "message", "message", "message"]


def test_a_background_response_must_be_stored_and_is_only_its_keys(gws: KeyedGateways) -> None:
    key, other = gws.key(), gws.key()
    r = raw(gws.urls[0], key, "POST", "", json={"model": FAST, "input": "x", "background": True, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background", r.text
    made = gws.sdk(gws.urls[0], key).responses.create(model=FAST, input="mine", background=True)
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/input_items")):
        assert raw(gws.urls[1], other, method, f"/{made.id}{path}").status_code == 404
    assert raw(gws.urls[1], other, "GET", f"/{made.id}", params={"stream": "true"}).status_code == 404
    # A response answered on its connection can neither be streamed again nor cancelled.
    plain = gws.sdk(gws.urls[0], key).responses.create(model=FAST, input="plain")
    assert raw(gws.urls[1], key, "GET", f"/{plain.id}", params={"stream": "true"}).status_code == 400
    assert raw(gws.urls[1], key, "POST", f"/{plain.id}/cancel").status_code == 400
    bad = raw(gws.urls[1], key, "GET", f"/{made.id}", params={"stream": "true", "starting_after": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"


def usage_of(gws: KeyedGateways, key: str, model: str) -> dict[str, int]:
    r = httpx.get(f"{gws.urls[1]}/admin/keys/{parse_key(key)[0]}/usage?days=1", timeout=10,  # type: ignore[index]
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    days = r.json()["days"]
    return days[0]["models"].get(model, {}) if days else {}


def record_events(gws: KeyedGateways, rid: str) -> list[Any]:
    r = redis.Redis.from_url(gws.stack.redis_url)
    try:
        return [e for _, fields in r.xrange(Keys(gws.stack.prefix).result(rid)) if b"e" in fields
                for e in Codec().decode_events(fields[b"e"])[0]]
    finally:
        r.close()


def wait_for(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_survives_kill_9_of_the_gateway_that_accepted_it(gws: KeyedGateways) -> None:
    gws.stack.synthetic(SLOW, *NUMBERED, "--tokens", str(TOKENS), "--token-delay", "0.05")
    key = gws.key()
    queued = gws.sdk(gws.urls[0], key).responses.create(model=SLOW, input="long", background=True)
    poll(lambda: raw(gws.urls[1], key, "GET", f"/{queued.id}"), lambda b: len(text_of(b)) > 0)
    r = raw(gws.urls[1], key, "POST", "", json={"model": SLOW, "input": "next", "previous_response_id": queued.id})
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_in_progress", r.text
    gws.procs[0].kill()
    # The engine finishes it into its record; nobody asked about it since.
    wait_for(lambda: any(isinstance(e, Done) for e in record_events(gws, queued.id)))
    # Continued straight away: the conversation holds its whole output.
    after = gws.sdk(gws.urls[1], key).responses.create(model=SLOW, input="next", previous_response_id=queued.id,
                                             max_output_tokens=16)
    items = list(gws.sdk(gws.urls[1], key).responses.input_items.list(after.id, order="asc"))
    assert [i.type for i in items] == ["message", "message", "message"]
    assert items[1].role == "assistant" and items[1].content[0].text == WHOLE  # type: ignore[union-attr]
    done = poll(lambda: raw(gws.urls[1], key, "GET", f"/{queued.id}"), lambda b: b["status"] != "in_progress")
    assert done["status"] == "completed" and text_of(done) == WHOLE, done
    gws.replace(0)
    assert gws.sdk(gws.urls[0], key).responses.retrieve(queued.id).output_text == WHOLE
    # Charged once, by whichever gateway stored its end (the one that accepted it was dead by then).
    wait_for(lambda: usage_of(gws, key, SLOW).get("completion_tokens") == TOKENS + 16)
    assert usage_of(gws, key, SLOW)["requests"] == 2


def test_charged_once_when_its_gateway_stops_mid_job(gws: KeyedGateways) -> None:
    gws.stack.synthetic(SLOW, *NUMBERED, "--tokens", str(TOKENS), "--token-delay", "0.05", wait=False)
    key = gws.key()
    queued = gws.sdk(gws.urls[0], key).responses.create(model=SLOW, input="long", background=True)
    poll(lambda: raw(gws.urls[1], key, "GET", f"/{queued.id}"), lambda b: len(text_of(b)) > 0)
    gws.procs[0].stop()  # SIGTERM: a rolling deploy
    gws.replace(0)
    done = poll(lambda: raw(gws.urls[0], key, "GET", f"/{queued.id}"), lambda b: b["status"] != "in_progress")
    assert done["status"] == "completed"
    for i in (0, 1, 0, 1):
        assert raw(gws.urls[i], key, "GET", f"/{queued.id}").status_code == 200
    wait_for(lambda: usage_of(gws, key, SLOW).get("completion_tokens") == TOKENS)
    time.sleep(1.5)  # (usage is written each second: a second charge would show by now)
    assert (usage_of(gws, key, SLOW)["requests"], usage_of(gws, key, SLOW)["completion_tokens"]) == (1, TOKENS)


def test_survives_kill_9_of_its_engine(gws: KeyedGateways) -> None:
    model = "bg-dies"
    first = gws.stack.synthetic(model, *NUMBERED, "--tokens", str(TOKENS), "--token-delay", "0.05")
    key = gws.key()
    queued = gws.sdk(gws.urls[1], key).responses.create(model=model, input="long", background=True)
    poll(lambda: raw(gws.urls[1], key, "GET", f"/{queued.id}"), lambda b: len(text_of(b)) > 4)
    gws.stack.synthetic(model, *NUMBERED, "--tokens", str(TOKENS), "--token-delay", "0.01")
    first.kill()
    done = poll(lambda: raw(gws.urls[0], key, "GET", f"/{queued.id}"), lambda b: b["status"] != "in_progress")
    # Run again from scratch by the other engine: the whole text once, not the first attempt's start twice.
    assert done["status"] == "completed" and text_of(done) == WHOLE, done


def test_a_stream_resumed_on_another_gateway_has_no_gap_and_no_duplicate(gws: KeyedGateways) -> None:
    gws.stack.synthetic(SLOW, *NUMBERED, "--tokens", str(TOKENS), "--token-delay", "0.05", wait=False)
    key = gws.key()
    body = {"model": SLOW, "input": "stream me", "background": True, "stream": True}
    with httpx.stream("POST", f"{gws.urls[1]}/v1/responses", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        before = sse(r.iter_lines(), stop_after=12)  # the client goes away mid-stream
    assert [e["type"] for e in before[:2]] == ["response.created", "response.queued"]
    rid = before[0]["response"]["id"]
    last = before[-1]["sequence_number"]
    with httpx.stream("GET", f"{gws.urls[0]}/v1/responses/{rid}", params={"stream": "true", "starting_after": last},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        after = sse(r.iter_lines())
    events = before + after
    validate_response_stream(events)
    assert events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == WHOLE
    # From the start, on either gateway: the same events.
    with httpx.stream("GET", f"{gws.urls[1]}/v1/responses/{rid}", params={"stream": "true"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as r:
        assert sse(r.iter_lines()) == events
    assert gws.sdk(gws.urls[0], key).responses.retrieve(rid).output_text == WHOLE


def test_cancelled_from_another_gateway(gws: KeyedGateways) -> None:
    model = "bg-cancel"
    gws.stack.synthetic(model, *NUMBERED, "--tokens", "2000", "--token-delay", "0.02")
    key = gws.key()
    queued = gws.sdk(gws.urls[0], key).responses.create(model=model, input="forever", background=True)
    poll(lambda: raw(gws.urls[1], key, "GET", f"/{queued.id}"), lambda b: len(text_of(b)) > 0)
    cancelled = gws.sdk(gws.urls[1], key).responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    validate_response(raw(gws.urls[0], key, "GET", f"/{queued.id}").json())
    seen = len(cancelled.output_text)
    # The engine dropped the job: it ended it in the record itself (a Failed of its own attempt).
    keys, codec = Keys(gws.stack.prefix), Codec()
    r = redis.Redis.from_url(gws.stack.redis_url)
    deadline = time.monotonic() + 20
    while not any(isinstance(e, Failed) and e.attempt >= 1 and e.code == "cancelled"
                  for _, fields in r.xrange(keys.result(queued.id)) if b"e" in fields
                  for e in codec.decode_events(fields[b"e"])[0]):
        assert time.monotonic() < deadline, r.xrange(keys.result(queued.id))
        time.sleep(0.05)
    r.close()
    again = gws.sdk(gws.urls[0], key).responses.retrieve(queued.id)
    assert again.status == "cancelled" and len(again.output_text) == seen
    assert gws.sdk(gws.urls[0], key).responses.cancel(queued.id).status == "cancelled"  # as it ended
    # Charged what it generated up to its cancellation (the tokens it shows), once.
    shown = len(again.output_text.split())
    wait_for(lambda: usage_of(gws, key, model).get("completion_tokens") == shown)
    assert usage_of(gws, key, model)["requests"] == 1


def test_bounds_streams_per_key_and_a_final_too_large_to_store(gws: KeyedGateways) -> None:
    gws.start(response_max_streams_per_key=2, response_max_record_bytes=2500)
    small, key = gws.stack.base_url, gws.key()
    gws.stack.synthetic("bg-long", *NUMBERED, "--tokens", "2000", "--token-delay", "0.02")
    made = gws.sdk(gws.urls[1], key).responses.create(model="bg-long", input="watch", background=True)  # 40 s
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", f"{small}/v1/responses/{made.id}", params={"stream": "true"},
                           headers=headers) as one, \
                client.stream("GET", f"{small}/v1/responses/{made.id}", params={"stream": "true"},
                              headers=headers) as two:
            assert (one.status_code, two.status_code) == (200, 200)
            lines = [one.iter_lines(), two.iter_lines()]  # (kept: a dropped iterator closes its connection)
            assert [next(it) for it in lines] == ["event: response.created"] * 2  # both are being served
            third = client.get(f"{small}/v1/responses/{made.id}", params={"stream": "true"}, headers=headers)
            assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded", third.text
        # (Closed: the key's streams are free again.)
        with client.stream("GET", f"{small}/v1/responses/{made.id}", params={"stream": "true"},
                           headers=headers) as again:
            assert again.status_code == 200
    assert gws.sdk(gws.urls[1], key).responses.cancel(made.id).status == "cancelled"
    # A burst of streamed background responses from one key: its bound holds (the others 429, nothing queued).
    # (A key of its own: none of its streams is open.)
    burst = gws.key()
    body = {"model": "bg-long", "input": "burst", "background": True, "stream": True, "max_output_tokens": 1500}
    answered = threading.Barrier(4)  # every stream stays open until all four are answered
    with ThreadPoolExecutor(4) as pool, httpx.Client(timeout=30) as client:
        def open_one(_: int) -> tuple[int, str]:
            with client.stream("POST", f"{small}/v1/responses", json=body,
                               headers={"Authorization": f"Bearer {burst}"}) as r:
                rid = "" if r.status_code != 200 else json.loads(next(
                    line for line in r.iter_lines() if line.startswith("data: "))[6:])["response"]["id"]
                answered.wait(timeout=20)
                return r.status_code, rid
        answers = list(pool.map(open_one, range(4)))
    assert sorted(status for status, _ in answers) == [200, 200, 429, 429], answers
    for _, rid in answers:
        if rid:
            assert gws.sdk(small, burst).responses.cancel(rid).status == "cancelled"
    # A response whose end is larger than a stored record may be (2,500 bytes here) still ends: failed,
    # its output not kept (not queued for ever).
    gws.stack.synthetic("bg-big", *NUMBERED, "--tokens", "600")  # ~2,300 bytes of text
    big = raw(small, key, "POST", "", json={"model": "bg-big", "input": "x", "background": True}).json()
    assert big["status"] == "queued"
    done = poll(lambda: raw(small, key, "GET", f"/{big['id']}"), lambda b: b["status"] not in ("queued", "in_progress"))
    assert done["status"] == "failed" and done["output"] == [], done
    assert "response_max_record_bytes" in done["error"]["message"]
