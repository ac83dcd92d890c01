"""The image store both sides share: Redis (with expiry) and a directory (mtime = expiry)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engines.contract.store import DirectoryImageStore, RedisImageStore, media_type, new_ref, open_image_store, valid_ref
from engines.contract.keys import Keys
from tests.harness import RedisServer


def test_references_are_unguessable_and_name_their_format() -> None:
    refs = {new_ref("png") for _ in range(1000)}
    assert len(refs) == 1000
    assert all(valid_ref(r) and r.endswith(".png") for r in refs)
    assert media_type(new_ref("webp")) == "image/webp"
    for bad in ("../etc/passwd", "img_abc.png", f"img_{'0' * 32}.gif", f"img_{'0' * 32}.png/..", ""):
        assert not valid_ref(bad)


async def test_redis_store_expires_images(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")
    store = open_image_store("redis", client, keys)
    assert isinstance(store, RedisImageStore)
    try:
        a, b = new_ref("png"), new_ref("jpeg")
        await store.put(a, b"A" * 1000, 60_000)
        await store.put(b, b"B", 300)
        assert await store.get(a) == b"A" * 1000
        assert await store.get_many([a, b, new_ref("png")]) == [b"A" * 1000, b"B", None]
        assert 0 < await client.pttl(keys.image(a)) <= 60_000
        await asyncio.sleep(0.5)
        assert await store.get(b) is None  # expired
        await store.delete([a])
        assert await store.get(a) is None
    finally:
        await client.aclose()


async def test_directory_store_expires_and_sweeps(tmp_path: Path) -> None:
    store = open_image_store(str(tmp_path / "images"), None, Keys())
    assert isinstance(store, DirectoryImageStore)
    a, b = new_ref("png"), new_ref("webp")
    await store.put(a, b"A", 60_000)
    await store.put(b, b"B", 200)
    assert await store.get_many([a, b]) == [b"A", b"B"]
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]  # no temp files left
    await asyncio.sleep(0.3)
    assert await store.get(b) is None
    assert store.sweep() == 1
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [a]
    await store.delete([a])
    assert await store.get(a) is None
    # A name that is not a reference is never a path.
    with pytest.raises(ValueError):
        await store.put("../escape.png", b"x", 1000)
    assert await store.get("../escape.png") is None


def test_sweep_removes_temp_files_of_interrupted_writes(tmp_path: Path) -> None:
    store = DirectoryImageStore(tmp_path)
    stale = tmp_path / f".{new_ref('png')}.tmp"
    stale.write_bytes(b"x")
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    assert store.sweep() == 1
    assert not stale.exists()


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "x", "/", ".png", " "])
async def test_a_reference_with_anything_after_it_is_not_one(tmp_path: Path, suffix: str) -> None:
    # The whole name must be a reference: `$` alone also matches before a final newline.
    from engines.contract.store import new_input_ref, stored_ref

    for ref in (new_ref("png"), new_input_ref("png")):
        assert not valid_ref(ref + suffix) and not stored_ref(ref + suffix)
        with pytest.raises(ValueError):
            await DirectoryImageStore(tmp_path).put(ref + suffix, b"x", 1000)
    assert sorted(tmp_path.iterdir()) == []


def test_inputs_are_stored_but_never_served_by_reference(tmp_path: Path) -> None:
    from engines.contract.store import new_input_ref, stored_ref

    ref = new_input_ref("png")
    assert stored_ref(ref) and not valid_ref(ref)  # the public image route looks up only outputs
    assert not stored_ref("in_../../etc/passwd.png")
    store = DirectoryImageStore(tmp_path)
    asyncio.run(store.put(ref, b"input", 60_000))
    assert asyncio.run(store.get(ref)) == b"input"


def test_the_directory_store_sweeps_expired_inputs_too(tmp_path: Path) -> None:
    from engines.contract.store import new_input_ref

    store = DirectoryImageStore(tmp_path)
    ref = new_input_ref("png")
    asyncio.run(store.put(ref, b"input", 1))
    time.sleep(0.01)
    assert store.sweep() == 1 and not (tmp_path / ref).exists()
