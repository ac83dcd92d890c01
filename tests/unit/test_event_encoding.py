"""A job's events that cannot be encoded fail that job, never the engine's event writer
(engines/events.py ``encoded``): an integer past 64 bits from a misbehaving upstream once ended the
writer's task, and the engine went on heart-beating while every later job timed out."""

from __future__ import annotations

import pytest

from engines.contract.messages import ChoiceDelta, Codec, Delta, Done, Failed, Usage
from engines.events import encoded


def test_an_unencodable_event_fails_its_job_and_spares_the_others(caplog: pytest.LogCaptureFixture) -> None:
    codec = Codec()
    good = Delta(job="a", choices=[ChoiceDelta(index=0, text="hi")], seq=1)
    bad = Delta(job="b", choices=[ChoiceDelta(index=2**70, text="x")], seq=3)
    later = Done(job="b", usage=Usage(prompt_tokens=1, completion_tokens=1), seq=4)
    also = Done(job="a", usage=Usage(prompt_tokens=1, completion_tokens=1), seq=2)
    events, unread = codec.decode_events(encoded(codec.encode, [good, bad, later, also]))
    assert unread == 0
    assert events[0] == good and events[2] == also
    failed = events[1]
    assert isinstance(failed, Failed) and (failed.job, failed.seq, failed.status) == ("b", 3, 502)
    assert len(events) == 3  # nothing more of the failed job
    assert "cannot encode" in caplog.text
    assert codec.decode_events(encoded(codec.encode, [good])) == ([good], 0)  # the common case, unchanged
