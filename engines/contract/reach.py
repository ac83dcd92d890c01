"""Whether Redis lets a process in, and the one line that tells its operator what to fix.

Every ``conduit`` process asks once, at startup (:func:`first_contact`), before it does anything
costly. A refused login (no password where Redis wants one, a wrong one, an unknown user) is a
setting to fix: no retry mends it, so the process exits naming the settings. An unreachable Redis
ends a one-shot command (``conduit keys``), while a gateway or an engine waits for it (it may start
after them, or be restarting), saying so once rather than once per retry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.exceptions import AuthenticationError, ResponseError

from engines.contract.lane import REDIS_ERRORS, connect, redacted

#: The words Redis answers a login it refuses with (``NOAUTH``, ``WRONGPASS``, RESP3's ``HELLO``
#: refusal), for a refusal that reaches a caller as a plain reply error (a script, a cluster node).
_REFUSALS = ("noauth", "wrongpass", "authentication required", "invalid username-password",
             "must be called with the client already authenticated", "invalid password")

#: How long the first contact may take: a Redis that answers nothing in this long is unreachable.
CONTACT_TIMEOUT_S = 5.0


class LoginRefused(Exception):
    """Redis refused this process's login: the message says which settings to fix."""


class Unreachable(Exception):
    """Redis did not answer (refused connection, unknown host, timeout): the message names the URL."""


def login_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing the login rather than Redis being away."""
    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(exc, ResponseError) and any(word in str(exc).lower() for word in _REFUSALS)


def refused_message(url: str, exc: BaseException, *, username: str, password: str, fix: str) -> str:
    """What to tell the operator when Redis at ``url`` refused the login: ``fix`` names the settings
    (the URL's own user and password count as given)."""
    parts = urlsplit(url)
    user = parts.username or username
    if not (parts.password or password or parse_qs(parts.query).get("password")):
        return f"Redis at {redacted(url)} requires a password and none was given: set {fix}"
    who = f" of user {user!r}" if user else ""
    return f"Redis at {redacted(url)} refused the login{who} ({_reason(exc)}): check {fix}"


def unreachable_message(url: str, exc: BaseException) -> str:
    """What to tell the operator when Redis at ``url`` did not answer."""
    return f"Redis at {redacted(url)} is not reachable ({_reason(exc)})"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


async def first_contact(redis: Any, url: str, *, username: str, password: str, fix: str) -> None:
    """PING Redis once through ``redis``; raise :class:`LoginRefused` or :class:`Unreachable` with
    the line to print (``fix``: the settings that hold the credentials, as this process reads them)."""
    try:
        await asyncio.wait_for(redis.ping(), CONTACT_TIMEOUT_S)
    except REDIS_ERRORS as exc:  # (a timeout is an OSError)
        if login_refused(exc):
            raise LoginRefused(refused_message(url, exc, username=username, password=password, fix=fix)) from None
        if isinstance(exc, ResponseError):
            return  # it answered (a NOPERM, say): reachable and logged in; the command that needs it will say
        raise Unreachable(unreachable_message(url, exc)) from None


def login_problem(url: str, *, cluster: bool, username: str, password: str, fix: str, log: logging.Logger,
                  meanwhile: str) -> str:
    """Ask Redis once, before a long-running process starts its work: why it refused the login
    (no retry mends that: the process should exit with it), or "". An unreachable Redis is logged
    on ``log`` (what the process does ``meanwhile``) and waited for later: it may start after the
    process, or be restarting."""

    async def ask() -> None:
        client = connect(url, cluster=cluster, username=username, password=password, socket_connect_timeout=5.0)
        try:
            await first_contact(client, url, username=username, password=password, fix=fix)
        finally:
            await client.aclose()

    try:
        asyncio.run(ask())
    except LoginRefused as exc:
        return str(exc)
    except Unreachable as exc:
        log.warning("%s; %s", exc, meanwhile)
    return ""


class Outage:
    """A retrying loop's Redis trouble said once, when it starts, and once when it ends, rather than
    once per retry (several a second, from each loop that outlives Redis)."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self.down = False

    def failed(self, exc: BaseException) -> None:
        """A try failed: said if it is the first since Redis last answered."""
        if not self.down:
            self._log.warning("%s failed (%s); retrying until Redis answers", self._what, exc)
        self.down = True

    def answered(self) -> None:
        """A try succeeded: the outage, if any, is over."""
        if self.down:
            self._log.info("%s: Redis answers again", self._what)
        self.down = False
