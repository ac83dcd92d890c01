"""engines/contract/reach.py: what a refused login or an outage is told as."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import AuthenticationError, ResponseError

from engines.contract.reach import Outage, login_refused, refused_message


def test_an_outage_is_said_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(logging.getLogger("t.reach"), "reading jobs")
    with caplog.at_level(logging.INFO, "t.reach"):
        outage.answered()
        for _ in range(20):
            outage.failed(ConnectionError("refused"))
        outage.answered()
        outage.answered()
    assert [r.getMessage() for r in caplog.records] == [
        "reading jobs failed (refused); retrying until Redis answers", "reading jobs: Redis answers again"]


def test_a_refusal_is_told_from_an_absence() -> None:
    assert login_refused(AuthenticationError("invalid username-password pair or user is disabled."))
    assert login_refused(ResponseError("NOAUTH Authentication required."))
    assert not login_refused(ResponseError("NOPERM this user has no permissions"))
    assert not login_refused(ConnectionError("Error 111 connecting"))


def test_the_message_says_whether_a_password_was_given_and_never_shows_it() -> None:
    exc = AuthenticationError("WRONGPASS invalid username-password pair")
    none = refused_message("redis://h:6379/0", exc, username="", password="", fix="CONDUIT_REDIS_PASSWORD")
    assert "requires a password and none was given" in none
    wrong = refused_message("redis://engine:hunter2@h:6379/0", exc, username="", password="", fix="X")
    assert "hunter2" not in wrong and "'engine'" in wrong and "redis://engine:***@h:6379/0" in wrong
    queried = refused_message("redis://h:6379/0?password=hunter2", exc, username="engine", password="", fix="X")
    assert "hunter2" not in queried and "refused the login of user 'engine'" in queried, queried
