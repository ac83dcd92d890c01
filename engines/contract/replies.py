"""A gateway's reply stream, both halves: the gateway makes it and keeps it alive, engines append.

A gateway creates its stream (``Keys.replies``) with an expiry of :data:`REPLY_STREAM_TTL_MS` and
refreshes it every second while it lives, so the stream of a gateway that is gone expires. Engines
append their events with :data:`APPEND`, which never makes the stream of a gateway that is gone:
the events of a job whose client nobody serves any more are dropped, not kept in a key that never
expires.

Redis may lose a live gateway's stream, though (a restart without persistence, a failover that
lost the last writes), and with it every event written before the gateway notices (up to a second)
and re-creates it: a gap in each stream's answer. So each append answers the stream's remaining
life (``PTTL``), and an engine that finds a stream missing before the expiry it last saw re-creates
it in the same script as its write, with the life it had left: a live gateway's stream is back at
once (its gateway refreshes it as before), and a gone gateway's lasts no longer than it would have.
An engine never makes a stream it has not seen, nor one whose last seen expiry passed.

A background response's result record (``Keys.result``, named by ``JobOptions.result``) is written
the same way, with the same entries: so its gateway must create it, with its expiry, *before* it
queues the job. A record missing at the job's first write is never made: its events are dropped
(``DROPPED``) and the job still ends and is acked, as a gone gateway's job is.

One key per script: one Redis Cluster slot. Imports no ML library (both sides use it).
"""

from __future__ import annotations

import hashlib

#: How long a reply stream outlives its gateway's last sign of life (the gateway refreshes it
#: every second).
REPLY_STREAM_TTL_MS = 60_000

# Appends one entry (a batch of encoded events) to a reply stream, as XADD NOMKSTREAM would,
# except that a missing stream is made when ARGV[3] > 0, with that expiry (ms) in the same step:
# never a stream without one. XADD is the first write, so under maxmemory the script is refused
# with nothing written (the engine writes it again).
# KEYS: 1 reply stream. ARGV: 1 its length cap (~), 2 the entry, 3 the life (ms) to give it if it
# is missing (0: leave it missing).
# Returns {DROPPED, -2} (missing, left so), or {APPENDED or RECREATED, the stream's PTTL after the
# write} (-1: no expiry, a gateway of an older version).
APPEND = """
local made = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  if tonumber(ARGV[3]) <= 0 then return {0, -2} end
  made = 1
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
if made == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {2, redis.call('PTTL', KEYS[1])}
end
return {1, redis.call('PTTL', KEYS[1])}
"""
APPEND_SHA = hashlib.sha1(APPEND.encode()).hexdigest()
DROPPED, APPENDED, RECREATED = 0, 1, 2


def append_command(stream: str, entry: bytes, *, maxlen: int, restore_ms: int) -> tuple[object, ...]:
    """The EVALSHA that appends ``entry`` to ``stream`` (:data:`APPEND`), re-creating it with
    ``restore_ms`` of life if Redis lost it (0: a stream that is missing stays missing)."""
    return ("EVALSHA", APPEND_SHA, 1, stream, maxlen, entry, max(restore_ms, 0))
