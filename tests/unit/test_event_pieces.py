"""An engine's flush of large events (embedding vectors) is written as several reply-stream entries of
about ``ENTRY_BYTES`` each, in order, never one entry past what Redis takes in a value."""

from __future__ import annotations

from engines.contract.messages import Delta, Done, Embedded
from engines.events import ENTRY_BYTES, pieces_of


def test_small_events_are_one_entry() -> None:
    events = [Delta(job="j", seq=i) for i in range(1, 1000)]
    assert pieces_of(events) == [events]


def test_large_vectors_are_split_in_order() -> None:
    vector = b"\x00" * (ENTRY_BYTES // 3)  # three fit in no entry with their overhead: two a piece
    events = [*(Embedded(job="j", index=i, vector=vector, seq=i + 1) for i in range(7)), Done(job="j", seq=8)]
    pieces = pieces_of(events)
    assert [len(p) for p in pieces] == [2, 2, 2, 2]
    assert [e for p in pieces for e in p] == events
    assert all(sum(len(getattr(e, "vector", b"")) for e in p) <= ENTRY_BYTES for p in pieces)
    # One vector larger than an entry still goes (alone).
    huge = Embedded(job="j", vector=b"\x00" * (ENTRY_BYTES + 1))
    assert pieces_of([huge, Done(job="j")]) == [[huge], [Done(job="j")]]
