"""When a background response counts as lost (``gateway.responses.records``), on real Redis: by its
record's deadline (the accepting gateway's), never by the reader's own ``request_timeout_s``; and once
overdue, ended in the record itself, so a late event of its engine changes nothing for any reader."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from engines.contract.keys import Keys
from engines.contract.messages import Codec, Done, Usage
from gateway.responses.background import job_of
from gateway.responses.records import OVERDUE_S, ResultRecords
from gateway.responses.store import ResponseStore
from gateway.settings import ResponseSettings
from tests.harness import RedisServer
from tests.unit.test_responses_background import head


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


def records(client: aioredis.Redis, keys: Keys, timeout_s: float) -> ResultRecords:
    settings = ResponseSettings()
    return ResultRecords(client, keys, None, ResponseStore(client, keys, settings), None,  # type: ignore[arg-type]
                         timeout_s, settings)


async def test_overdue_by_the_records_deadline_and_ended_in_the_record(client: aioredis.Redis) -> None:
    keys = Keys(f"overdue-{os.urandom(4).hex()}")
    patient, hasty = records(client, keys, 600), records(client, keys, 1)
    now_ms = int(time.time() * 1000)
    # Made long ago by a gateway of a long deadline: a reader of a 1 s timeout must not call it lost.
    running = msgspec.structs.replace(head(), id="resp_" + os.urandom(12).hex(), created_at=now_ms // 1000 - 120)
    await patient.make(running.id, now_ms + 600_000)
    assert (await hasty.render(running)).final is None
    # Past its deadline by more than OVERDUE_S: ended job_lost, written into its record.
    late = msgspec.structs.replace(running, id="resp_" + os.urandom(12).hex())
    await patient.make(late.id, now_ms - int(OVERDUE_S * 1000) - 1000)
    lost = (await hasty.render(late)).final
    assert lost is not None and lost.status == "failed"
    # Its engine's Done arriving after changes nothing, for any reader.
    done = Codec().encode([Done(job=job_of(late.id), usage=Usage(1, 1), seq=1)])
    await client.execute_command("XADD", keys.result(late.id), "*", "e", done)
    again = (await patient.render(late)).final
    assert again is not None and again.status == "failed" and again.error == lost.error
