"""A background response rendered from its result record (``gateway.responses.background.Replay``): the
exactly-once rules of a run (a new attempt starts over, a given-up attempt or submission is dropped, a
repeated number is dropped), the gateway's end (attempt 0), cancellation, and a resumed stream's
events (``starting_after``): the same events, numbered the same, on every rendering."""

from __future__ import annotations

import json
from typing import Any

from engines.contract.messages import ChoiceDelta, Delta, Done, Failed, Started, Usage
from gateway.responses.background import Replay, job_of
from gateway.responses.records import after
from gateway.responses.objects import ReasoningConfig, ResponseObject, TextConfig
from gateway.responses.protocol import TextFormatText

RID = "resp_00ff"
JOB = job_of(RID)


def head() -> ResponseObject:
    return ResponseObject(id=RID, created_at=1_800_000_000, status="queued", background=True, instructions=None,
                          max_output_tokens=None, max_tool_calls=None, model="m", output=[],
                          parallel_tool_calls=True, prompt_cache_key=None, reasoning=ReasoningConfig(),
                          safety_identifier=None, temperature=1.0, text=TextConfig(format=TextFormatText()),
                          tool_choice="auto", tools=[], top_logprobs=0, top_p=1.0, metadata={})


def delta(text: str, seq: int, attempt: int = 1, job: str = JOB, finish: str | None = None) -> Delta:
    return Delta(job=job, choices=[ChoiceDelta(index=0, text=text, finish_reason=finish)], attempt=attempt, seq=seq)


def render(entries: list[Any], *, stream: bool = False) -> tuple[Replay, bytes]:
    """Render record entries: a list of events (an engine's), or a dict of fields (the gateway's)."""
    replay = Replay(head(), stream=stream)
    out = bytearray()
    if stream:
        replay.open(head(), out)
    for i, entry in enumerate(entries):
        entry_id = b"%d-0" % (1_800_000_001_000 + i)
        if isinstance(entry, dict):
            replay.entry(entry_id, entry, out)
        else:
            replay.feed(entry_id, entry, out)
    return replay, bytes(out)


def text(replay: Replay) -> str:
    return "".join(p.text for item in replay.now().output for p in item.content)  # type: ignore[union-attr]


def test_queued_then_in_progress_then_completed_at_the_records_time() -> None:
    replay, _ = render([])
    assert replay.now().status == "queued"
    replay, _ = render([[Started(job=JOB, seq=1)], [delta("a ", 2)]])
    assert (replay.now().status, text(replay), replay.now().output[0].status) == ("in_progress", "a ", "in_progress")
    replay, _ = render([[Started(job=JOB, seq=1), delta("a ", 2)], [delta("b", 3, finish="stop"),
                                                                    Done(job=JOB, usage=Usage(3, 2), seq=4)]])
    final = replay.final
    assert final is not None and final.status == "completed" and text(replay) == "a b"
    assert final.completed_at == 1_800_000_001 and final.usage.output_tokens == 2  # type: ignore[union-attr]


def test_a_new_attempt_starts_over_and_the_old_ones_events_are_dropped() -> None:
    replay, _ = render([[Started(job=JOB, seq=1), delta("0 ", 2), delta("1 ", 3)],
                        [Started(job=JOB, attempt=2, seq=1), delta("0 ", 2, attempt=2)],
                        [delta("2 ", 4, attempt=1)],  # the dead engine's last words
                        [delta("0 ", 2, attempt=2), delta("1 ", 3, attempt=2),  # a write that landed twice
                         Done(job=JOB, attempt=2, seq=4)]])
    assert replay.final is not None and text(replay) == "0 1 "


def test_a_resubmitted_job_starts_over_and_its_earlier_submission_is_dropped() -> None:
    again = "resp-0a0a"
    replay, _ = render([{b"deadline": b"1800000600000"}, [Started(job=JOB, seq=1), delta("x ", 2)],
                        {b"job": again.encode()}, [Started(job=again, seq=1)], [delta("late ", 3)],
                        [delta("y", 2, job=again), Done(job=again, seq=3)]])
    assert replay.final is not None and text(replay) == "y" and replay.deadline_ms == 1_800_000_600_000


def test_a_job_the_gateway_did_not_announce_is_not_this_responses() -> None:
    replay, _ = render([[Started(job=JOB, seq=1), delta("x ", 2)], [Done(job="resp-0b0b", seq=1)],
                        [Done(job=JOB, usage=Usage(1, 1), seq=3)]])
    assert replay.final is not None and text(replay) == "x " and replay.usage.completion_tokens == 1


def test_a_gap_in_the_numbering_fails_it_output_lost() -> None:
    replay, _ = render([[Started(job=JOB, seq=1), delta("0 ", 2)], [delta("2 ", 4), Done(job=JOB, seq=5)]])
    assert replay.final is not None and replay.final.status == "failed"
    assert replay.final.error is not None and "lost" in replay.final.error.message


def test_the_gateways_end_ends_it_and_nothing_after_counts() -> None:
    lost = Failed(job=JOB, message="lost", code="job_lost", status=503, attempt=0)
    replay, _ = render([[Started(job=JOB, seq=1), delta("a", 2)], [lost], [Done(job=JOB, seq=3)]])
    assert replay.final is not None and replay.final.status == "failed"
    assert replay.final.error is not None and replay.final.error.code == "server_error"
    assert replay.final.output[0].status == "incomplete"


def test_cancelled_keeps_the_output_so_far() -> None:
    cancel = Failed(job=JOB, message="The response was cancelled.", code="cancelled", status=499, attempt=0)
    replay, out = render([[Started(job=JOB, seq=1), delta("a", 2)], [cancel]], stream=True)
    assert replay.final is not None and replay.final.status == "cancelled" and text(replay) == "a"
    assert b"response.failed" not in out and b"response.completed" not in out


def events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_a_stream_renders_the_same_events_every_time_and_resumes_without_gap_or_duplicate() -> None:
    entries = [[Started(job=JOB, seq=1)], [delta("a ", 2)], [delta("b ", 3), delta("c", 4, finish="stop")],
               [Done(job=JOB, usage=Usage(1, 3), seq=5)]]
    _, whole = render(entries, stream=True)
    _, again = render(entries, stream=True)
    assert whole == again
    all_events = events(whole)
    assert [e["sequence_number"] for e in all_events] == list(range(len(all_events)))
    assert [e["type"] for e in all_events[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert all_events[-1]["type"] == "response.completed"
    for n in range(-1, len(all_events)):
        rest, left = after(whole, n + 1)
        assert left == 0 and events(rest) == all_events[n + 1:]
    # Skipping across chunks: what is left to skip carries over.
    first, left = after(whole[:whole.index(b"\n\n") + 2], 3)
    assert (first, left) == (b"", 2)
