"""Where engines put the images they make and gateways read them from.

An engine writes each image once, with an expiry; its reply-stream event carries only the
image's reference (:class:`~engines.contract.messages.ImageReady`). Every gateway replica can then
answer ``b64_json`` (read, encode, forget) and ``url`` (served at
``/v1/images/files/{ref}`` until it expires) from that one copy.

Two stores, chosen alike on gateways and engines by the ``image_store`` setting:

* ``redis`` (the default): a string key per image (``Keys.image``) with ``PX`` expiry, in
  the Redis (or Cluster) the queue uses. Images take Redis memory for their lifetime: size
  ``maxmemory`` for ``images/s x lifetime x image size`` (a 512 px PNG is ~0.4 MB).
* a directory path: one file per image on a volume every gateway and engine mounts. The
  file's modification time is set to its expiry, so no index is needed: a file whose mtime
  passed is expired, and :meth:`DirectoryImageStore.sweep` deletes those.

References are 128 random bits plus the format's extension (``img_<32 hex>.png``): a URL is
a capability, unguessable, and says what it holds.

The same store holds a job's large inputs (``JobOptions.inputs``: the images of an image edit), under
``in_<32 hex>.<ext>`` references that no route serves (:func:`valid_ref` is false for them).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from engines.contract.keys import Keys

#: Output formats and their media types.
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

#: Used with ``fullmatch`` only: ``match`` with ``$`` also accepts the name followed by a newline.
_REF = re.compile(r"img_[0-9a-f]{32}\.(png|jpeg|webp)")
_STORED = re.compile(r"(img|in)_[0-9a-f]{32}\.(png|jpeg|webp)")


def new_ref(fmt: str) -> str:
    """A fresh, unguessable image reference for format ``fmt``."""
    return f"img_{os.urandom(16).hex()}.{fmt}"


def new_input_ref(fmt: str) -> str:
    """A fresh reference for a job's input (``JobOptions.inputs``) of format ``fmt``; never served."""
    return f"in_{os.urandom(16).hex()}.{fmt}"


def valid_ref(ref: str) -> bool:
    """Whether ``ref`` has the shape of an output's reference, the only kind served (anything else
    is never looked up)."""
    return _REF.fullmatch(ref) is not None


def stored_ref(ref: str) -> bool:
    """Whether ``ref`` has the shape of anything the store holds: an output's or an input's."""
    return _STORED.fullmatch(ref) is not None


def media_type(ref: str) -> str:
    return MEDIA_TYPES[ref.rpartition(".")[2]]


class ImageStore(Protocol):
    """Images by reference, each with an expiry."""

    async def put(self, ref: str, data: bytes, ttl_ms: int) -> None:
        """Store ``data`` under ``ref`` for ``ttl_ms`` milliseconds."""

    async def get(self, ref: str) -> bytes | None:
        """The image, or None when it is unknown or expired."""

    async def get_many(self, refs: list[str]) -> list[bytes | None]:
        """Several images at once (one round trip where the store allows)."""

    async def delete(self, refs: list[str]) -> None:
        """Forget images nobody will ask for again (``b64_json`` answers, partial previews)."""


class RedisImageStore:
    """Images as Redis strings with ``PX`` expiry."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def put(self, ref: str, data: bytes, ttl_ms: int) -> None:
        await self.redis.set(self.keys.image(ref), data, px=max(ttl_ms, 1))

    async def get(self, ref: str) -> bytes | None:
        data: bytes | None = await self.redis.get(self.keys.image(ref))
        return data

    async def get_many(self, refs: list[str]) -> list[bytes | None]:
        if not refs:
            return []
        # One GET per key: MGET would need every key in one slot on a Redis Cluster.
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.get(self.keys.image(ref))
        return list(await pipe.execute())

    async def delete(self, refs: list[str]) -> None:
        if refs:
            pipe = self.redis.pipeline(transaction=False)
            for ref in refs:
                pipe.delete(self.keys.image(ref))
            await pipe.execute()


class DirectoryImageStore:
    """Images as files in a shared directory; a file's mtime is its expiry."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, ref: str) -> Path:
        if not stored_ref(ref):  # never a path outside the directory
            raise ValueError(f"not an image reference: {ref!r}")
        return self.root / ref

    def _put(self, ref: str, data: bytes, ttl_ms: int) -> None:
        path = self._path(ref)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        expires = time.time() + ttl_ms / 1000
        os.utime(tmp, (expires, expires))
        os.replace(tmp, path)  # readers never see half a file

    def _get(self, ref: str) -> bytes | None:
        try:
            path = self._path(ref)
            if path.stat().st_mtime <= time.time():
                return None
            return path.read_bytes()
        except (OSError, ValueError):
            return None

    def _delete(self, refs: list[str]) -> None:
        for ref in refs:
            try:
                self._path(ref).unlink(missing_ok=True)
            except (OSError, ValueError):
                pass

    async def put(self, ref: str, data: bytes, ttl_ms: int) -> None:
        await asyncio.to_thread(self._put, ref, data, ttl_ms)

    async def get(self, ref: str) -> bytes | None:
        return await asyncio.to_thread(self._get, ref)

    async def get_many(self, refs: list[str]) -> list[bytes | None]:
        return await asyncio.to_thread(lambda: [self._get(r) for r in refs])

    async def delete(self, refs: list[str]) -> None:
        await asyncio.to_thread(self._delete, refs)

    def sweep(self) -> int:
        """Delete expired images and inputs (and leftovers of interrupted writes); returns how many."""
        now = time.time()
        removed = 0
        for path in self.root.iterdir():
            try:
                st = path.stat()
                stale_tmp = path.name.startswith(".") and st.st_mtime < now - 3600 * 24 * 2
                if (stored_ref(path.name) and st.st_mtime <= now) or stale_tmp:
                    path.unlink(missing_ok=True)
                    removed += 1
            except OSError:
                continue
        return removed


def open_image_store(setting: str, redis: Any, keys: Keys) -> ImageStore:
    """The store an ``image_store`` setting names: ``redis`` or a directory path."""
    if setting in ("", "redis"):
        return RedisImageStore(redis, keys)
    return DirectoryImageStore(setting)
