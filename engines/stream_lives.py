"""What an engine remembers of each stream it writes events to: when it is due to expire, which
generation it is, and the entries this engine wrote to it in the last seconds.

A reply stream Redis lost (a restart without persistence) is made again (by its gateway, or by the
next write that finds it missing while it should still live: ``engines.contract.replies``), with a
new generation. What the engine had written to it that its gateway had not read yet went with it;
the engine's next write sees the generation change, writes nothing, and the writer sends the
stream's recent entries again ahead of the new ones (:meth:`StreamLives.resend`): gateways drop the
events they already had by their numbers and get the ones they missed, in order. Times are this
process's monotonic clock, so no two clocks need agree.
"""

from __future__ import annotations

import time
from collections import deque

#: Entries kept per stream, for resending: those written in the last seconds before its latest
#: write (an outage of any length keeps them, since nothing is written meanwhile), at most this many
#: and bytes (the oldest go first).
WINDOW_MS = 10_000
WINDOW_ENTRIES = 512
WINDOW_BYTES = 16 * 1024 * 1024


class _Stream:
    __slots__ = ("until", "generation", "sent", "size", "resend")

    def __init__(self) -> None:
        #: Monotonic ms at which it expires (0: unknown).
        self.until = 0.0
        #: The generation its last write found ('': none, or not known yet).
        self.generation = ""
        #: (monotonic ms, entry) of its recent entries, oldest first, and their bytes.
        self.sent: deque[tuple[float, bytes]] = deque()
        self.size = 0
        #: Its recent entries go again ahead of the next ones (its generation changed).
        self.resend = False


class StreamLives:
    """Each stream's expiry as its last write heard (``PTTL``, counted from when that write was sent:
    never later than Redis would say), its generation and its recent entries.

    A stream found missing before its expiry was lost by Redis, not let go by its gateway: the next
    write re-creates it with the life it had left."""

    __slots__ = ("_streams", "_swept", "_resend")

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._swept = 0.0
        #: The streams whose recent entries are to go again (what :meth:`resending` looks through: most
        #: flushes find it empty).
        self._resend: set[str] = set()

    @staticmethod
    def now() -> float:
        return time.monotonic() * 1000

    def left(self, stream: str, now: float) -> int:
        """The ms of life ``stream`` had left at ``now`` (0: unknown, or expired)."""
        s = self._streams.get(stream)
        return max(int(s.until - now), 0) if s is not None else 0

    def generation(self, stream: str) -> str:
        """The generation to name in the next write: the last seen, or '' (write whatever it is) when
        none is known or the stream's recent entries are being sent again."""
        s = self._streams.get(stream)
        return "" if s is None or s.resend else s.generation

    def resend(self, stream: str) -> list[bytes]:
        """The entries to write ahead of ``stream``'s next ones: its recent entries once its generation
        changed (:meth:`changed`), else none."""
        s = self._streams.get(stream)
        return [entry for _, entry in s.sent] if s is not None and s.resend else []

    def changed(self, stream: str) -> None:
        """A write found ``stream`` lost or made again: its recent entries go again with the next."""
        s = self._streams.get(stream)
        if s is not None:
            s.resend = True
            self._resend.add(stream)

    def changed_all(self) -> None:
        """Redis may have lost the end of any stream (a write failed: a restart, a failover that lost
        its last writes, a crash with up to a second of its log): every stream's recent entries go again."""
        for name, s in self._streams.items():
            if s.sent:
                s.resend = True
                self._resend.add(name)

    def resending(self) -> list[str]:
        """The streams whose recent entries are to go again, even with nothing new to write."""
        return [name for name in self._resend if self._streams[name].sent] if self._resend else []

    def heard(self, stream: str, sent: float, pttl: int, generation: str = "", entries: list[bytes] = ()) -> None:
        """A write sent at ``sent`` found ``stream`` with ``pttl`` ms to live (< 0: none, or missing) and
        ``generation``, and wrote its recent entries again if it was to, then ``entries`` (which are kept:
        pass none for a stream that is never resent, a result record). Resent entries keep their times."""
        s = self._streams.get(stream)
        if s is None:
            s = self._streams[stream] = _Stream()
        s.until = sent + pttl if pttl >= 0 else 0.0
        s.generation = generation
        s.resend = False
        self._resend.discard(stream)
        for entry in entries:
            s.sent.append((sent, entry))
            s.size += len(entry)
        while s.sent and (s.sent[0][0] < sent - WINDOW_MS or len(s.sent) > WINDOW_ENTRIES or s.size > WINDOW_BYTES):
            s.size -= len(s.sent.popleft()[1])
        if sent - self._swept > 60_000:  # gateways come and go: forget the streams that expired
            self._swept = sent
            self._streams = {k: v for k, v in self._streams.items() if v.until > sent or v.resend}
            self._resend &= self._streams.keys()
