"""The synthetic engine reads only what its job's kind defines (``engines/synthetic.py``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engines.synthetic import SyntheticBackend, SyntheticSettings
from engines.contract.messages import ChoiceDelta, Generated, Job, Usage


class Recorder:
    """A ``JobOutput`` that keeps what the backend wrote."""

    def __init__(self) -> None:
        self.deltas: list[list[ChoiceDelta]] = []
        self.usage: Usage | None = None

    def started(self) -> None:
        pass

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        self.deltas.append(choices)

    def done(self, usage: Usage) -> None:
        self.usage = usage


@pytest.mark.parametrize(("kind", "body", "prompt_tokens"), [
    # Found by fuzzing: a chat request with a field named `prompt` that is an object (the gateway
    # passes unknown fields through) failed the job with a 500; so did `messages` in a completion.
    ("chat", {"messages": [{"role": "user", "content": "hi there"}], "prompt": {"x": 1}, "n": 2}, 2),
    ("completion", {"prompt": "a b c", "messages": 5, "max_completion_tokens": "many", "n": 2}, 3),
    ("completion", {"prompt": [[1, 2], [3]], "messages": [{"content": {"a": 1}}]}, 3),
])
async def test_fields_of_the_other_kind_are_ignored(kind: str, body: dict[str, Any], prompt_tokens: int) -> None:
    backend = SyntheticBackend(SyntheticSettings(models=["m"], tokens=2))
    out = Recorder()
    job = Job(id="j", kind=kind, model="m", body=json.dumps({"model": "m", **body}).encode(), reply_to="r",
              deadline_ms=2**40)
    await backend.run(job, out)  # type: ignore[arg-type]
    n = body.get("n", 1)
    assert out.usage == Usage(prompt_tokens=prompt_tokens, completion_tokens=2 * n)
    assert [len(d) for d in out.deltas] == [n, n]
