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

What Redis lost with the stream, though, is gone: the entries engines wrote that the gateway had not
read yet, written just before the restart (a gap in those jobs' events, which fails a stream whose
output began: ``output_lost``). So each incarnation of a reply stream has a **generation**, a random
value in a key beside it (:func:`generation_key`, the same slot), set by whoever makes the stream
(the gateway, or an engine re-making it). An engine passes the generation it last saw with each
append; one that finds the stream missing or of another generation writes nothing
(:data:`CHANGED`) and writes again with the entries it sent in the last seconds first (repeats are
dropped by the gateway by their numbers), so nothing written before the loss is missing after it.
Engines also write every stream's recent entries again, with or without new ones, when Redis fails
one of their connections (a restart, a failover that lost the last writes). The gateway keeps its
stream with :data:`KEEP` (never trimming what engines wrote, never replacing a generation one made)
and, when it stops, marks its generation :data:`GONE`: no engine makes that stream again.

A background response's result record (``Keys.result``, named by ``JobOptions.result``) is written
the same way, with the same entries: so its gateway must create it, with its expiry, *before* it
queues the job. A record missing at the job's first write is never made: its events are dropped
(``DROPPED``) and the job still ends and is acked, as a gone gateway's job is.

One key per script: one Redis Cluster slot. Imports no ML library (both sides use it).
"""

from __future__ import annotations

import hashlib
import os

#: How long a reply stream outlives its gateway's last sign of life (the gateway refreshes it
#: every second).
REPLY_STREAM_TTL_MS = 60_000

# Appends a stream's entries of one flush (each a batch of encoded events), all or none, as XADD
# NOMKSTREAM would, except that a missing stream is made when ARGV[2] > 0, with that expiry (ms) in
# the same step: never a stream without one. XADD is the first write, so under maxmemory the script
# is refused with nothing written (the engine writes them again), and once it writes it writes all.
# With its generation key (KEYS[2]; a result record has none): a writer that names the generation it
# last saw (ARGV[3]) and finds the stream missing or of another generation writes nothing (CHANGED);
# a stream made here gets generation ARGV[4]; a stream whose gateway stopped (its generation GONE)
# is never made again.
# KEYS: 1 reply stream, [2 its generation]. ARGV: 1 its length cap (~), 2 the life (ms) to give it if
# it is missing (0: leave it missing), 3 the generation last seen ('': do not check), 4 the generation
# of a stream made here, 5... the entries.
# Returns {state, the stream's PTTL after the write (-1: no expiry, a gateway of an older version;
# -2: none written), its generation ('' : none)}, state DROPPED (missing, left so), APPENDED,
# RECREATED or CHANGED (nothing written).
APPEND = """
local gen = ''
if KEYS[2] then gen = redis.call('GET', KEYS[2]) or '' end
if gen == 'gone' then return {0, -2, gen} end
local exists = redis.call('EXISTS', KEYS[1]) == 1
if KEYS[2] and ARGV[3] ~= '' and ((not exists) or gen ~= ARGV[3]) then return {3, -2, gen} end
local made = 0
if not exists then
  if tonumber(ARGV[2]) <= 0 then return {0, -2, gen} end
  made = 1
end
for i = 5, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
if made == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if KEYS[2] then
    redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[2])
    gen = ARGV[4]
  end
  return {2, redis.call('PTTL', KEYS[1]), gen}
end
return {1, redis.call('PTTL', KEYS[1]), gen}
"""
APPEND_SHA = hashlib.sha1(APPEND.encode()).hexdigest()
DROPPED, APPENDED, RECREATED, CHANGED = 0, 1, 2, 3
#: The generation of a stream whose gateway stopped: engines drop its events, never make it again.
GONE = "gone"

# The gateway's side, every second and at start: keep its stream alive, or make it (with a marker
# entry, never trimming what engines wrote) and a new generation; a live stream without a generation
# (made by an engine of an older version) gets one. Returns 1 when the stream was there, 0 when made.
# KEYS: 1 reply stream, 2 its generation. ARGV: 1 the life (ms), 2 a new generation.
KEEP = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
  return 1
end
redis.call('XADD', KEYS[1], '*', 'h', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return 0
"""


def generation_key(stream: str) -> str:
    """The key holding reply stream ``stream``'s generation (``Keys.reply_generation``: its slot)."""
    return f"{stream}:gen"


def new_generation() -> str:
    """A fresh generation for a stream being made."""
    return os.urandom(8).hex()


def append_command(stream: str, entries: list[bytes], *, maxlen: int, restore_ms: int, seen: str | None = None,
                   generation: str = "") -> tuple[object, ...]:
    """The EVALSHA that appends ``entries`` to ``stream``, all or none (:data:`APPEND`), re-creating it
    with ``restore_ms`` of life if Redis lost it (0: a stream that is missing stays missing). ``seen``:
    the generation last seen ('': none yet, or write whatever it is; None: a stream without one, a
    result record, or a Redis whose users predate generations); ``generation``: the one to give a
    stream made here."""
    if seen is None:
        return ("EVALSHA", APPEND_SHA, 1, stream, maxlen, max(restore_ms, 0), "", "", *entries)
    return ("EVALSHA", APPEND_SHA, 2, stream, generation_key(stream), maxlen, max(restore_ms, 0), seen,
            generation or new_generation(), *entries)
