"""A stored response's input items (``gateway.responses.chain.stored_items``: ids and shapes of
OpenAI's ``ItemResource``) and their pages (``gateway.responses.retrieval.page``), validated against
OpenAI's ``ResponseItemList``."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequest
from gateway.responses.chain import stored_items
from gateway.responses.retrieval import ItemsQuery, page
from gateway.responses.store import RESPONSE_ID
from gateway.settings import ResponseSettings
from tests.openai_schema import validate

ITEMS: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
    {"role": "assistant", "content": "Let me look."},
    {"type": "message", "role": "assistant", "id": "msg_kept", "status": "completed",
     "content": [{"type": "output_text", "text": "Looking."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"type": "reasoning", "id": "rs_1", "summary": []},
]


def as_list(data: list[dict[str, Any]]) -> dict[str, Any]:
    return msgspec.to_builtins(page(data, ItemsQuery(limit=100, order="asc")))  # type: ignore[no-any-return]


def test_a_string_input_is_one_user_message_with_an_id() -> None:
    [item] = stored_items("hello")
    assert re.fullmatch(r"msg_[0-9a-f]{24}", item["id"])
    assert item == {"id": item["id"], "type": "message", "role": "user", "status": "completed",
                    "content": [{"type": "input_text", "text": "hello"}]}
    validate("ResponseItemList", as_list([item]))


def test_every_item_gets_an_id_and_the_shape_openai_lists() -> None:
    items = stored_items(ITEMS)
    validate("ResponseItemList", as_list(items))
    prefixes = [item["id"].partition("_")[0] for item in items]
    assert prefixes == ["msg", "msg", "msg", "msg", "fc", "fco", "rs"]
    assert items[3]["id"] == "msg_kept" and items[6]["id"] == "rs_1"  # ids sent are kept
    assert len({item["id"] for item in items}) == len(items)
    assert items[0]["content"] == [{"type": "input_text", "text": "Be brief."}]
    assert items[2]["content"] == [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]
    assert (items[3]["content"][0]["annotations"], items[3]["content"][0]["logprobs"]) == ([], [])
    assert (items[4]["status"], items[5]["status"]) == ("completed", "completed")
    assert ITEMS[0] == {"role": "developer", "content": "Be brief."}  # the request's own items are left alone


def test_pages_follow_order_limit_and_after() -> None:
    items = [{"id": f"msg_{i}", "type": "message", "role": "user", "status": "completed",
              "content": [{"type": "input_text", "text": str(i)}]} for i in range(5)]
    first = page(items, ItemsQuery(limit=2))  # newest first by default
    assert [i["id"] for i in first.data] == ["msg_4", "msg_3"] and first.has_more
    assert (first.first_id, first.last_id) == ("msg_4", "msg_3")
    second = page(items, ItemsQuery(limit=2, after=first.last_id))
    assert [i["id"] for i in second.data] == ["msg_2", "msg_1"] and second.has_more
    last = page(items, ItemsQuery(limit=2, after=second.last_id))
    assert [i["id"] for i in last.data] == ["msg_0"] and not last.has_more
    validate("ResponseItemList", msgspec.to_builtins(last))
    assert [i["id"] for i in page(items, ItemsQuery(order="asc", after="msg_2")).data] == ["msg_3", "msg_4"]
    exact = page(items, ItemsQuery(limit=5))
    assert len(exact.data) == 5 and not exact.has_more
    empty = page(items, ItemsQuery(order="asc", after="msg_4"))
    assert (empty.data, empty.first_id, empty.last_id, empty.has_more) == ([], None, None, False)
    with pytest.raises(InvalidRequest) as refused:
        page(items, ItemsQuery(after="msg_9"))
    assert refused.value.param == "after"


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"order": "up"}])
def test_a_query_out_of_bounds_is_refused(query: dict[str, str]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(query, ItemsQuery, strict=False)


def test_only_response_ids_name_a_record() -> None:
    assert RESPONSE_ID.fullmatch("resp_" + "0a" * 12)
    for other in ("resp_", "resp_XYZ", "resp_1:x", "msg_00", "resp_1}*", "resp_" + "0" * 65):
        assert not RESPONSE_ID.fullmatch(other), other
    with pytest.raises(ValueError):
        ResponseSettings(response_ttl_s=0)


def test_only_a_short_unused_string_id_sent_is_kept() -> None:
    """``input_items``' ``after`` names one item: an id that is no string, too long, or already an id of
    this record (in the conversation it continues, or earlier in its input) gets a fresh one."""
    msg = {"type": "message", "role": "user", "content": "hi"}
    prior = [{"id": "msg_old", "type": "message", "role": "user", "status": "completed", "content": []}]
    sent = [{**msg, "id": 7}, {**msg, "id": "m" * 65}, {**msg, "id": "m" * 64}, {**msg, "id": "m" * 64},
            {**msg, "id": "msg_old"}, {**msg, "id": ""}, {**msg, "id": "msg_mine"}]
    ids = [item["id"] for item in stored_items(sent, prior)]
    assert ids[2] == "m" * 64 and ids[6] == "msg_mine"
    for fresh in (ids[0], ids[1], ids[3], ids[4], ids[5]):
        assert re.fullmatch(r"msg_[0-9a-f]{24}", fresh), fresh
    assert len(set(ids) | {"msg_old"}) == len(ids) + 1
    validate("ResponseItemList", as_list(stored_items(sent, prior)))


def test_a_record_has_a_positive_bound() -> None:
    assert ResponseSettings().response_max_record_bytes == 4 * 1024 * 1024
    assert ResponseSettings().response_store_max_bytes == 1024 ** 3
    with pytest.raises(ValueError):
        ResponseSettings(response_max_record_bytes=0)
