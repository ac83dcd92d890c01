"""Stored responses through two keyed gateway processes on one Redis and synthetic engines: the
`openai` SDK's ``responses.retrieve``, ``.delete`` and ``.input_items.list`` (every body validated
against OpenAI's schemas), ``previous_response_id`` across the gateways and after one restarts, a key
that cannot see another's, ``store: false``, streamed, incomplete and failed responses, the expiry of
every record and the bytes a key may store, counted in its usage."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from engines.contract.keys import Keys
from gateway.tenancy.keys import parse_key
from tests.harness import RedisServer, Stack
from tests.keyed import KeyedGateways
from tests.openai_schema import validate, validate_response

ADMIN = "responses-store-admin-credential-0123456789"
MODEL, SLOW = "synthetic", "slow"
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
ARGUMENTS = '{"city": "Paris"}'
TTL_S = 300
#: The small gateway's budget of stored bytes per key: a few records of these tests' size.
BUDGET = 6000


class Gateways(KeyedGateways):
    """Three keyed gateways on one Redis: ``urls[0]`` and ``urls[1]`` as deployed (the second is
    restarted by a test), ``small`` with a small store budget, short TTL and a 2 s request deadline."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(stack, ADMIN)
        self.start(response_max_stored_bytes=BUDGET, response_ttl_s=TTL_S, request_timeout_s=2)
        self.small = stack.base_url
        stack.api_key = self.key()


@pytest.fixture(scope="module")
def gws(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    stack = Stack(redis_server.url, tmp_path_factory.mktemp("responses-store"))
    g = Gateways(stack)
    stack.synthetic(MODEL, "--tokens", "4", "--tool-calls", "--tool-arguments", ARGUMENTS)
    stack.synthetic(SLOW, "--tokens", "100", "--token-delay", "0.1")
    yield g
    g.close()


def raw(url: str, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{url}/v1/responses{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=30, **kwargs)


def record_keys(gws: Gateways, key: str) -> tuple[Keys, str]:
    return Keys(gws.stack.prefix), parse_key(key)[0]  # type: ignore[index]


def stored_bytes(gws: Gateways, key_id: str) -> int:
    r = httpx.get(f"{gws.small}/admin/keys/{key_id}/usage?days=1", timeout=10,
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return int(r.json()["days"][0]["models"].get(MODEL, {}).get("stored_bytes", 0))


def test_a_stored_response_is_retrieved_listed_and_deleted_on_the_other_gateway(gws: Gateways) -> None:
    key = gws.key()
    one, two = gws.sdk(gws.urls[0], key), gws.sdk(gws.urls[1], key)
    created = one.responses.create(model=MODEL, input="hello there", instructions="Be brief.", metadata={"k": "v"})
    got = raw(gws.urls[1], key, "GET", f"/{created.id}")
    assert got.status_code == 200, got.text
    validate_response(got.json())
    assert got.json() == created.model_dump(mode="json", exclude_unset=True)
    assert "store" not in got.json()  # OpenAI's Response has no such field
    head = raw(gws.urls[1], key, "HEAD", f"/{created.id}")
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"",
                                                                                got.headers["content-length"])
    retrieved = two.responses.retrieve(created.id)
    assert (retrieved.output_text, retrieved.instructions, retrieved.metadata) == ("tok " * 4, "Be brief.", {"k": "v"})

    items = two.responses.input_items.list(created.id)
    [item] = items.data
    assert (item.type, item.role, item.content[0].text) == ("message", "user", "hello there")  # type: ignore[union-attr]
    listed = raw(gws.urls[0], key, "GET", f"/{created.id}/input_items")
    validate("ResponseItemList", listed.json())
    assert listed.json()["data"][0]["id"] == item.id and item.id.startswith("msg_")  # type: ignore[union-attr]
    assert raw(gws.urls[0], key, "GET", f"/{created.id}/input_items", params={"limit": 0}).json()["error"][
        "param"] == "limit"

    deleted = raw(gws.urls[1], key, "DELETE", f"/{created.id}")
    assert deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        two.responses.delete(created.id)
    with pytest.raises(openai.BadRequestError) as gone:
        one.responses.create(model=MODEL, input="and?", previous_response_id=created.id)
    assert (gone.value.code, gone.value.param) == ("previous_response_not_found", "previous_response_id")
    # A response stored then deleted is gone as a never-stored one is.
    kept = two.responses.create(model=MODEL, input="hi")
    two.responses.delete(kept.id)
    assert raw(gws.urls[0], key, "GET", f"/{kept.id}").status_code == 404


def test_a_conversation_continues_across_gateways_and_a_restart(gws: Gateways) -> None:
    key = gws.key()
    first = gws.sdk(gws.urls[0], key).responses.create(
        model=MODEL, input=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,  # type: ignore[arg-type]
        instructions="You are a weather bot.")
    [call] = first.output
    assert call.type == "function_call" and call.arguments == ARGUMENTS  # type: ignore[union-attr]
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}  # type: ignore[union-attr]
    second = gws.sdk(gws.urls[1], key).responses.create(model=MODEL, input=[answer], tools=TOOLS,  # type: ignore[arg-type, list-item]
                                                        previous_response_id=first.id)
    assert second.output_text == "tool said: sunny" and second.previous_response_id == first.id
    validate_response(raw(gws.urls[1], key, "GET", f"/{second.id}").json())
    # The model saw what a stateless client replaying the conversation sends: the first turn's input and
    # output, then the new input; not the first turn's instructions.
    replay = [{"role": "user", "content": "Weather in Paris?"}, *(o.model_dump(mode="json", exclude_unset=True)
                                                                    for o in first.output), answer]
    stateless = gws.sdk(gws.urls[0], key).responses.create(model=MODEL, input=replay, tools=TOOLS, store=False)  # type: ignore[arg-type]
    assert (second.output_text, second.usage) == (stateless.output_text, stateless.usage)

    # Its input items: the conversation, oldest first with `order=asc`, newest first by default.
    asc = raw(gws.urls[0], key, "GET", f"/{second.id}/input_items", params={"order": "asc"}).json()
    validate("ResponseItemList", asc)
    assert [i["type"] for i in asc["data"]] == ["message", "function_call", "function_call_output"]
    assert asc["data"][1]["id"] == call.id and asc["data"][2]["id"].startswith("fco_") and not asc["has_more"]
    pages = gws.sdk(gws.urls[1], key).responses.input_items.list(second.id, limit=1)
    assert [i.id for i in pages] == [i["id"] for i in reversed(asc["data"])]  # the SDK follows `after`

    # The gateway that served the second turn stops; a new one continues the conversation.
    gws.procs[1].stop()
    gws.replace(1)
    with gws.sdk(gws.urls[1], key).responses.stream(model=MODEL, input="Thanks!",
                                                    previous_response_id=second.id) as stream:
        third = stream.get_final_response()
    assert third.status == "completed" and third.previous_response_id == second.id
    stored = gws.sdk(gws.urls[0], key).responses.retrieve(third.id)  # streamed responses are stored too
    assert (stored.status, stored.output_text, stored.usage, stored.previous_response_id, stored.created_at) == (
        third.status, third.output_text, third.usage, third.previous_response_id, third.created_at)
    validate_response(raw(gws.urls[0], key, "GET", f"/{third.id}").json())
    assert [i.type for i in gws.sdk(gws.urls[0], key).responses.input_items.list(third.id, order="asc")] == [
        "message", "function_call", "function_call_output", "message", "message"]


def test_a_key_sees_only_its_own_responses(gws: Gateways) -> None:
    mine, theirs = gws.key(), gws.key()
    created = gws.sdk(gws.urls[0], mine).responses.create(model=MODEL, input="secret")
    unknown = "resp_" + "0" * 24
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/input_items")):
        foreign = raw(gws.urls[1], theirs, method, f"/{created.id}{path}")
        absent = raw(gws.urls[1], theirs, method, f"/{unknown}{path}")
        assert foreign.status_code == absent.status_code == 404
        assert foreign.json() == json.loads(absent.text.replace(unknown, created.id))  # no oracle
    with pytest.raises(openai.BadRequestError) as refused:
        gws.sdk(gws.urls[1], theirs).responses.create(model=MODEL, input="more", previous_response_id=created.id)
    assert refused.value.code == "previous_response_not_found"
    assert gws.sdk(gws.urls[1], mine).responses.retrieve(created.id).output_text == "tok " * 4  # still there
    assert raw(gws.urls[0], mine, "GET", "/not-an-id").status_code == 404


def test_store_false_keeps_nothing(gws: Gateways) -> None:
    key = gws.key()
    client = gws.sdk(gws.urls[0], key)
    created = client.responses.create(model=MODEL, input="hi", store=False)
    assert raw(gws.urls[1], key, "GET", f"/{created.id}").status_code == 404
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="more", previous_response_id=created.id)
    assert refused.value.param == "previous_response_id"
    keys, key_id = record_keys(gws, key)
    with redis.Redis.from_url(gws.stack.redis_url) as r:
        assert r.exists(keys.stored_response(key_id, created.id), *keys.stored_response_ledger(key_id)) == 0


def test_records_expire_and_a_key_stores_at_most_its_budget(gws: Gateways) -> None:
    key = gws.key()
    client = gws.sdk(gws.small, key)
    # Incomplete responses (streamed or not) are stored; a failed one (its deadline passed) is not.
    with client.responses.stream(model=MODEL, input="hi", max_output_tokens=2) as stream:
        last = [event for event in stream][-1]
    assert last.type == "response.incomplete"
    incomplete = last.response  # type: ignore[union-attr]
    assert client.responses.retrieve(incomplete.id).status == "incomplete"
    with client.responses.stream(model=SLOW, input="hi") as stream:
        failed = [event for event in stream][-1]
    assert failed.type == "response.failed"
    assert raw(gws.small, key, "GET", f"/{failed.response.id}").status_code == 404  # type: ignore[union-attr]
    # Once the key holds its budget, a request that would store is refused before it runs (400
    # response_store_full): every response answered was stored; one with store false still runs.
    made = [incomplete.id]
    for _ in range(20):
        try:
            made.append(client.responses.create(model=MODEL, input="x " * 200, previous_response_id=made[-1]).id)
        except openai.BadRequestError as refused:
            assert (refused.code, refused.param) == ("response_store_full", "store")
            break
        assert raw(gws.small, key, "GET", f"/{made[-1]}").status_code == 200
    else:
        pytest.fail(f"{BUDGET} bytes held every response")
    stored = made
    keys, key_id = record_keys(gws, key)
    with redis.Redis.from_url(gws.stack.redis_url) as r:
        sizes = [r.strlen(keys.stored_response(key_id, rid)) for rid in stored]
        live = int(r.hget(keys.stored_response_ledger(key_id)[1], "live"))  # type: ignore[arg-type]
        assert all(sizes) and sum(sizes) == live and live - sizes[-1] < BUDGET <= live  # at most one record over
        assert sizes[-1] > sizes[0]  # each record holds its whole conversation
        for name in [*(keys.stored_response(key_id, rid) for rid in stored), *keys.stored_response_ledger(key_id)]:
            assert 0 < r.pttl(name) <= TTL_S * 1000, name
    assert client.responses.create(model=MODEL, input="hi", store=False).status == "completed"
    # The bytes stored are counted in the key's usage (written each second).
    deadline = time.monotonic() + 10
    while (counted := stored_bytes(gws, key_id)) != sum(sizes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted == sum(sizes)
    # Deleting gives its bytes back: the key stores again.
    client.responses.delete(stored[-1])
    again = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert client.responses.retrieve(again.id).id == again.id
    # The next key's budget is its own.
    other = gws.key()
    kept = gws.sdk(gws.small, other).responses.create(model=MODEL, input="x " * 200)
    assert raw(gws.small, other, "GET", f"/{kept.id}").status_code == 200
