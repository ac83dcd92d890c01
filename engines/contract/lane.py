"""A dedicated Redis connection for the hot paths, with callers' commands batched.

redis-py's client takes a pooled connection, wraps each command in retry logic and packs
it alone; at thousands of requests per second that machinery costs more than Redis does.
A :class:`RedisLane` owns one connection (redis-py's own ``Connection``: same protocol
code, auth and TLS) and writes every command queued since its last round trip in one
pipelined write, then reads the replies in order. Many concurrent requests thus share a
round trip; a single request pays no extra hop beyond one event-loop turn.

Imports no ML library (both the gateway and the engines use it).
"""

from __future__ import annotations

import asyncio
import logging
import math
from urllib.parse import unquote_plus, urlsplit, urlunsplit
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

log = logging.getLogger("conduit.redis")

Command = tuple[Any, ...]

#: A single Redis server's client or a Redis Cluster's: both speak the same commands here.
RedisClient = aioredis.Redis | RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: What a Redis call raises when Redis is down, slow, failing over or refusing (``OOM``,
#: ``NOSCRIPT``, ``READONLY``...): every caller that outlives Redis catches exactly these, decided
#: here once (``OSError`` covers ``TimeoutError`` and the socket's own errors).
REDIS_ERRORS: tuple[type[Exception], ...] = (ConnectionError, OSError, aioredis.RedisError)
#: The subset a lane retries on a fresh connection: the connection broke, the command may not
#: have reached Redis (a reply error is an answer, never retried).
RECONNECT_ERRORS: tuple[type[Exception], ...] = (ConnectionError, OSError, aioredis.ConnectionError,
                                                 aioredis.TimeoutError)


def _hidden(parameter: str) -> str:
    name, eq, _ = parameter.partition("=")
    return f"{name}=***" if eq and unquote_plus(name).lower() == "password" else parameter


def redacted(url: str) -> str:
    """``url`` without its password, for logs (``redis://:secret@host`` -> ``redis://:***@host``),
    wherever it is: the user part or the query (``?password=secret``, which redis-py takes too)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = "&".join(_hidden(p) for p in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def connect(url: str, *, cluster: bool = False, username: str = "", password: str = "", **kwargs: Any) -> Any:
    """A client for ``url``: a Redis Cluster's when ``cluster`` is set or the URL's scheme is
    ``redis+cluster://`` (``rediss+cluster://`` with TLS), else a single server's.

    ``username`` and ``password`` (a Redis ACL user) are used where the URL carries none
    (``redis://user:password@host``: the URL's own win); TLS options ride in the URL's query
    (``rediss://host:6380/0?ssl_ca_certs=/path/ca.crt``). The cluster client discovers every
    node from the one in the URL and follows failovers, authenticating to each alike.
    """
    if username:
        kwargs.setdefault("username", username)
    if password:
        kwargs.setdefault("password", password)
    scheme, sep, rest = url.partition("://")
    if scheme in _CLUSTER_SCHEMES:
        url, cluster = f"{_CLUSTER_SCHEMES[scheme]}{sep}{rest}", True
    if cluster:
        # Reads block at most a few seconds (BLOCK 1000): a 5 s timeout ends a read on a frozen
        # master instead of hanging it forever, and the client then finds the new master.
        kwargs.pop("max_connections", None)
        return RedisCluster.from_url(url, decode_responses=False, socket_timeout=5, **kwargs)
    return aioredis.from_url(url, decode_responses=False, **kwargs)


class ScriptLoader:
    """Loads a Lua script into Redis once, however many callers find it missing at the same moment
    (after a Redis restart every request in flight gets NOSCRIPT: one load each could take more
    connections than the pool has, and fail them all)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def load(self, script: str) -> None:
        fut = self._loading.get(script)
        if fut is None:
            fut = self._loading[script] = asyncio.ensure_future(self._redis.script_load(script))

            def loaded(done: asyncio.Future[Any]) -> None:
                self._loading.pop(script, None)
                if not done.cancelled():
                    done.exception()  # retrieved: its waiters get it; no "never retrieved" when none is left

            fut.add_done_callback(loaded)
        await asyncio.shield(fut)


def open_lane(redis: Any, name: str, *, blocking: bool = False) -> RedisLane | ClusterLane:
    """The lane for ``redis``: one pipelined connection, or (cluster) the cluster's pipelines."""
    if isinstance(redis, RedisCluster):
        return ClusterLane(redis, name)
    return RedisLane(redis, name, blocking=blocking)


class RedisLane:
    """Pipelines commands from many callers over one connection; replies in call order.

    Commands whose connection broke (or whose reply timed out) are sent once more on a fresh
    connection, though Redis may already have run them: at-least-once. Every command Conduit
    sends through a lane is safe to repeat: job submission is idempotent (the job key), events
    are numbered (gateways drop repeats), acks and deletes are idempotent, reads are reads.
    """

    def __init__(self, redis: aioredis.Redis, name: str = "lane", *, blocking: bool = False) -> None:
        self._pool = redis.connection_pool
        self._name = name
        # A lane for blocking reads (XREAD BLOCK) must not time out while Redis waits.
        self._read_timeout = math.inf if blocking else None
        self._conn: Any = None
        self._queue: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"redis-{self._name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2)
        if self._conn is not None:
            await self._conn.disconnect()
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(ConnectionError("redis lane closed"))

    async def round_trip(self, commands: list[Command]) -> list[Any]:
        """Run ``commands`` now, in the calling task: for a lane with one user (a reader or a
        writer loop), which saves the hand-over to the lane's task. Do not mix with
        :meth:`pipeline` on the same lane."""
        return await self._round_trip(commands)

    async def execute(self, *args: Any) -> Any:
        """One command; raises its error (``ResponseError``) or a connection error."""
        return _answer(await self.pipeline([args]))

    async def call(self, *args: Any) -> Any:
        """One command in the calling task (:meth:`round_trip`'s terms); raises as :meth:`execute`."""
        return _answer(await self._round_trip([args]))

    def pipeline(self, commands: list[Command]) -> asyncio.Future[list[Any]]:
        """Queue commands for the next round trip; the future gets their replies in order
        (a failed command's reply is its ``ResponseError``)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # once: on 3.11 each call is a getpid()
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._queue.append((commands, fut))
        self._wake.set()
        return fut

    async def _connection(self) -> Any:
        if self._conn is None:
            conn = self._pool.make_connection()
            await conn.connect()
            self._conn = conn
        return self._conn

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            commands = [c for cmds, _ in batch for c in cmds]
            try:
                replies = await self._round_trip(commands)
            except REDIS_ERRORS as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            i = 0
            for cmds, fut in batch:
                if not fut.done():
                    fut.set_result(replies[i:i + len(cmds)])
                i += len(cmds)

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        for attempt in (1, 2):
            try:
                conn = await self._connection()
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                replies = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response(timeout=self._read_timeout))
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
            except RECONNECT_ERRORS:
                lost = self._conn is not None  # set only once connected
                if self._conn is not None:
                    await self._conn.disconnect()
                    self._conn = None
                if attempt == 2:
                    raise
                if lost:  # not while Redis stays away: its callers say that, once
                    log.warning("redis %s connection lost; reconnecting", self._name)
        raise AssertionError("unreachable")


class ClusterLane:
    """:class:`RedisLane`'s interface over a Redis Cluster client.

    Each round trip is a cluster pipeline: split by slot into one pipelined write per node, in
    parallel, with replies back in call order (so no order holds *between* nodes: callers that
    need one thing to land before another use two round trips, as the event writer does).
    Failures the cluster client raises outside redis-py's error tree (a slot not covered
    during a failover, its internal races) come out as ``ConnectionError``s, so callers
    treat them as the transient outage they are.
    """

    def __init__(self, redis: RedisCluster, name: str = "lane") -> None:
        self._redis = redis
        self._name = name

    def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def round_trip(self, commands: list[Command]) -> list[Any]:
        try:
            if len(commands) == 1 and commands[0][0] in ("XREAD", "XREADGROUP"):
                # A blocking read straight to its stream's node (no key look-up round trips).
                cmd = commands[0]
                node = self._redis.get_node_from_key(cmd[cmd.index("STREAMS") + 1])
                try:
                    return [await self._redis.execute_command(*cmd, target_nodes=node)]
                except ResponseError as exc:
                    return [exc]
            pipe = self._redis.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            return list(await pipe.execute(raise_on_error=False))
        except (RedisClusterException, AttributeError, IndexError, KeyError) as exc:
            await self._refresh()
            raise aioredis.ConnectionError(f"redis cluster {self._name}: {exc!r}") from exc
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            await self._refresh()
            raise

    async def _refresh(self) -> None:
        try:
            await self._redis.nodes_manager.initialize()
        except Exception as exc:  # noqa: BLE001 - the next round trip tries again
            log.debug("cluster topology refresh failed: %s", exc)

    async def execute(self, *args: Any) -> Any:
        return _answer(await self.round_trip([args]))

    call = execute

    def pipeline(self, commands: list[Command]) -> asyncio.Future[list[Any]]:
        return asyncio.ensure_future(self.round_trip(commands))


def _answer(replies: list[Any]) -> Any:
    """The reply of a one-command round trip, raised when it is Redis's error."""
    (reply,) = replies
    if isinstance(reply, Exception):
        raise reply
    return reply


def entry_fields(fields: Any) -> dict[bytes, bytes]:
    """A stream entry's fields as a dict: raw replies list them flat, the cluster client's
    parsed replies as a dict already."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=False))


def stream_entries(reply: Any) -> Iterator[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
    """(stream, [(entry id, [field, value, ...])]) from an XREAD/XREADGROUP reply.

    RESP3 answers with a map of stream -> entries, RESP2 with a list of pairs; nil when
    nothing arrived before the block timed out.
    """
    if not reply:
        return iter(())
    return iter(reply.items() if isinstance(reply, dict) else reply)
