"""The fault suite's verdict on one answer (tests/fault/load.py): what counts as lost or duplicated."""

from __future__ import annotations

from tests.fault.load import CLEAN_ERROR, COMPLETED, DUPLICATED, LOST, Answer, judge

ERROR = {"message": "gone", "type": "server_error", "param": None, "code": "engine_lost"}


def answer(stream: bool, status: int, tokens: list[int], *, done: bool = True, finish: str | None = "stop",
           error: object = None) -> Answer:
    return Answer(stream=stream, status=status, text=[f"{i} " for i in tokens], finish_reason=finish,
                  error=error, done=done)


def test_complete_answers() -> None:
    assert judge(answer(False, 200, list(range(5))), None, 5)[0] == COMPLETED
    assert judge(answer(True, 200, list(range(5))), None, 5)[0] == COMPLETED


def test_a_repeated_token_is_a_duplicate_whatever_else_happened() -> None:
    assert judge(answer(True, 200, [0, 1, 1, 2, 3, 4]), None, 5)[0] == DUPLICATED
    assert judge(answer(True, 200, [0, 1, 1], error=ERROR), None, 5)[0] == DUPLICATED
    assert judge(answer(True, 200, [0, 0], done=False), "client timeout", 5)[0] == DUPLICATED


def test_success_with_missing_tokens_is_lost() -> None:
    assert judge(answer(False, 200, [0, 1, 3, 4]), None, 5) == (LOST, "gap in the answer")
    assert judge(answer(True, 200, [0, 1, 2]), None, 5)[0] == LOST
    assert judge(answer(True, 200, list(range(5)), done=False), None, 5)[0] == LOST
    assert judge(answer(False, 200, list(range(5)), finish=None), None, 5)[0] == LOST


def test_clean_errors() -> None:
    assert judge(answer(False, 502, [], error=ERROR), None, 5) == (CLEAN_ERROR, "502 engine_lost")
    assert judge(answer(True, 503, [], error=ERROR, done=False), None, 5)[0] == CLEAN_ERROR
    assert judge(answer(True, 200, [0, 1], error=ERROR), None, 5)[0] == CLEAN_ERROR


def test_unclean_errors_are_lost() -> None:
    assert judge(answer(True, 200, [0, 2], error=ERROR), None, 5)[0] == LOST  # corrupt text shown
    assert judge(answer(True, 200, [0, 1], error=ERROR, done=False), None, 5)[0] == LOST
    assert judge(answer(False, 502, [], error="Bad Gateway"), None, 5)[0] == LOST
    assert judge(answer(False, 504, [], error={**ERROR, "code": "deadline_exceeded"}), None, 5)[0] == LOST
    assert judge(answer(True, 200, [0, 1], done=False), "RemoteProtocolError", 5) == (LOST, "RemoteProtocolError")
