"""The HTTP edge: every route the app registers, under every spelling, without a credential.

A client without a key may reach only the public list (``/health``, ``/ready``,
``/openapi.json``, image files, ``/metrics`` while metrics auth is off) with GET or HEAD (every
GET route answers HEAD: ``test_head_answers_like_get_without_a_body``); every other request
is a 401 or a 404 in OpenAI's envelope, whatever the spelling of its path (doubled, trailing
and percent-encoded slashes, dot segments, percent-encoded dots, case, query strings) and
whatever its method (HEAD, OPTIONS, ones no route has). The routes come from the app itself, so a
route added later is walked too. Requests go out byte for byte as written (``http.client``
neither normalises nor re-encodes a request target), through the real server (uvicorn, which
decodes percent-encoding before the app sees the path).
"""

from __future__ import annotations

import http.client
import socket
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.tenancy.keys import HASHER
from tests.harness import Stack
from tests.integration.test_telemetry import create_key

# Building the app here to list its routes: Litestar 2.23+ asks for explicitly marked dependencies.

ADMIN = "edge-admin-credential-0123456789"
#: Values for the routes' path parameters (any value: the route is what is being walked).
PARAMS = {"name": "0123456789abcdef0123456789abcdef.png", "model_id": "synthetic", "key_id": "0123456789ab",
          "response_id": "resp_0123456789abcdef01234567"}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND")


def routes(settings: GatewaySettings) -> list[tuple[str, frozenset[str], dict[str, str]]]:
    """(path with its parameters filled in, the methods it registers, method -> access) of every
    route the gateway's app registers under ``settings``."""
    app = create_app(settings)
    out = []
    for route in app.routes:
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PARAMS[m[1]], route.path)
        access = {m: h.opt.get("access", "key") for h in route.route_handlers for m in h.http_methods}
        out.append((path, frozenset(route.methods), access))
    return out


def spellings(path: str) -> Iterator[str]:
    """Request targets that name ``path`` differently, each a way past a guard that compares
    strings (and some plain mistakes a client makes)."""
    yield path
    yield path + "/"
    yield "/" + path
    yield path.replace("/", "//")
    slashes = [i for i, c in enumerate(path) if c == "/"]
    for i in slashes[1:]:
        yield path[:i] + "/" + path[i:]  # one inner slash doubled
        yield path[:i] + "%2F" + path[i + 1:]  # one inner slash percent-encoded
        yield path[:i] + "/./" + path[i + 1:]
        yield path[:i] + "/%2e/" + path[i + 1:]
        yield path[:i] + "/x/../" + path[i + 1:]
    yield "/%2F" + path[1:]
    yield "/%2f" + path[1:]
    yield "/." + path
    yield "/x/.." + path
    yield "/x/%2e%2e" + path
    yield "/x/%2E%2E" + path
    yield "/%2e%2e" + path
    yield path + "/."
    yield path + "/.."
    yield path + "/%2e%2e/x"
    yield path.upper()
    yield path[:1] + path[1:2].upper() + path[2:]
    yield path[:1] + f"%{ord(path[1]):02x}" + path[2:]  # a letter percent-encoded (decodes to the path)
    yield path + "?x=1"
    yield path + "?"
    yield path + "?/../../admin/keys"
    yield path + "%3Fx=1"
    yield path + ";x=1"
    yield path + "%00"
    yield path + "%20"
    yield "/" + path[1:].replace("/", "\\")


def send(port: int, method: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body:
            conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def walk(port: int, settings: GatewaySettings) -> tuple[int, list[str]]:
    """Send every spelling of every route with every method, without a credential. Returns how
    many requests went out and what went wrong: anything but a 401 / 404 in OpenAI's envelope,
    except the canonical spelling of a public route with its own method."""
    problems = []
    sent = 0
    for path, methods, access in routes(settings):
        for target in dict.fromkeys(spellings(path)):
            for method in METHODS:
                status, body = send(port, method, target)
                sent += 1
                # Public: the canonical path once the server decoded it, with the route's own method
                # (GET or HEAD: the route registers both).
                open_route = (unquote(target.split("?")[0]) == path and method in methods
                              and (access.get(method) == "public"
                                   or (access.get(method) == "metrics" and not settings.tenancy.metrics_protected)))
                if open_route:
                    continue
                if status not in (401, 404):
                    problems.append(f"{method} {target} -> {status} {body[:120]!r}")
                elif method != "HEAD":
                    error = json.loads(body)["error"]
                    if set(error) != {"message", "type", "param", "code"}:
                        problems.append(f"{method} {target} -> {status} without OpenAI's envelope: {body[:120]!r}")
    return sent, problems


def _gateway(stack: Stack, **settings: Any) -> GatewaySettings:
    stack.gateway(auth=True, auth_failures=1_000_000, **settings)
    return GatewaySettings.from_env({}, **settings)


def test_no_spelling_of_any_route_reaches_it_without_a_credential(stack: Stack) -> None:
    settings = _gateway(stack, admin_key_hash=HASHER.hash(ADMIN))
    sent, problems = walk(stack.port, settings)
    assert {p for p, _, _ in routes(settings)} >= {"/admin/keys", "/v1/chat/completions", "/metrics"}
    assert sent > 3000
    assert not problems, f"{len(problems)} of {sent} requests got through:\n" + "\n".join(problems[:40])
    # The canonical spellings still serve those who hold the credential.
    status, _ = send(stack.port, "GET", "/admin/keys", {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200


def test_admin_routes_do_not_exist_without_an_admin_credential(stack: Stack) -> None:
    settings = _gateway(stack, metrics_auth=True, metrics_key_hash=HASHER.hash(ADMIN + "-metrics"))
    assert not [p for p, _, _ in routes(settings) if p.startswith("/admin")]
    sent, problems = walk(stack.port, settings)
    assert not problems, f"{len(problems)} of {sent} requests got through:\n" + "\n".join(problems[:40])
    admin = routes(GatewaySettings.from_env({}, admin_key_hash="x"))
    for path, _, _ in admin:
        if path.startswith("/admin"):
            for target in dict.fromkeys(spellings(path)):
                for method in ("GET", "POST", "PATCH", "DELETE"):
                    status, body = send(stack.port, method, target, {"Authorization": f"Bearer {ADMIN}"})
                    assert status == 404, f"{method} {target} -> {status} {body[:200]!r}"


def _exchange(port: int, method: str, target: str, authorization: str = "") -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, headers, every byte after the head) of one request, read off the socket
    until the server closes it: what a HEAD answer carries after its head is there to see."""
    auth = f"Authorization: Bearer {authorization}\r\n".encode() if authorization else b""
    answer = _raw(port, f"{method} {target} HTTP/1.1\r\nHost: x\r\n".encode() + auth + b"Connection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, dict(line.lower().split(b": ", 1) for line in lines), body


def test_head_answers_like_get_without_a_body(stack: Stack) -> None:
    """HEAD on a GET route: GET's status and headers (its Content-Length too), no body (RFC 9110
    9.3.2); public where GET is, a key or the admin credential where GET needs one."""
    _gateway(stack, admin_key_hash=HASHER.hash(ADMIN))
    key = create_key(stack, "head")
    missing = "/v1/images/files/" + PARAMS["name"]
    for target, credential in (("/health", ""), ("/ready", ""), ("/openapi.json", ""), ("/metrics", ""),
                               (missing, ""), ("/v1/models", key), ("/v1/models/synthetic", key),
                               ("/admin/keys", ADMIN), ("/v1/models", "")):
        get_status, get_headers, get_body = _exchange(stack.port, "GET", target, credential)
        status, headers, body = _exchange(stack.port, "HEAD", target, credential)
        assert (status, body) == (get_status, b""), f"HEAD {target}: {status!r} {body[:200]!r}"
        varying = {b"date", b"x-request-id"} | ({b"content-length"} if target == "/metrics" else set())
        assert {k: v for k, v in headers.items() if k not in varying} == {
            k: v for k, v in get_headers.items() if k not in varying}, target
        assert int(headers[b"content-length"]) > 0 and (target == "/metrics" or len(get_body) == int(
            headers[b"content-length"]))


@pytest.mark.parametrize("target", ["//v1/models", "/v1//models", "/v1/models/", "/v1/./models", "/x/../v1/models",
                                    "/%2Fv1/models"])
def test_a_non_canonical_spelling_is_refused_even_with_a_key(stack: Stack, target: str) -> None:
    """Refused before anything else, as a 404 in OpenAI's envelope that names the rule."""
    stack.gateway(auth=False)
    status, body = send(stack.port, "GET", target)
    assert status == 404, body
    assert "not a canonical path" in json.loads(body)["error"]["message"]
    assert send(stack.port, "GET", "/v1/models")[0] == 200


def _raw(port: int, head: bytes, chunk: int = 65_536) -> bytes:
    """Send ``head`` in ``chunk``-sized writes; what the server answered until it closed the
    connection (b"" when it reset it: a server that closes with unread bytes in its socket does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        out = b""
        try:
            for i in range(0, len(head), chunk):
                s.sendall(head[i:i + chunk])
            while block := s.recv(65_536):
                out += block
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        return out


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_request_heads_are_bounded(stack: Stack) -> None:
    """A request line and headers past ``max_header_bytes`` get a 431 in OpenAI's envelope and the
    connection is closed, however the bytes arrive; heads within it, one after another on a
    kept-alive connection, are served."""
    stack.gateway(auth=False, max_header_bytes=8192)
    big = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n"
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-P: a\r\n" * 2000 + b"\r\n"
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\n" + (b"X-Pad: " + b"a" * 8000 + b"\r\n") * 2500 + b"\r\n"  # 20 MB
    # Trailers of a chunked body are headers too (parsed and kept by the server), one long one or many.
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    trailers = chunked + (b"X-T: " + b"a" * 8000 + b"\r\n") * 2500 + b"\r\n"
    trailer = chunked + b"X-T: " + b"a" * 20_000_000 + b"\r\n\r\n"
    url = b"GET /v1/models?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    gateway = stack.procs[-1].proc.pid
    before = _rss_kib(gateway)
    # Requests pipelined behind one in progress: queued by the server, so bounded in number too.
    pipelined = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n" * 250_000  # 8 MB
    for head in (huge, trailers, trailer, pipelined, huge):  # 88 MB in all
        answer = _raw(stack.port, head)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ") or head is pipelined, answer[:300]
    assert _rss_kib(gateway) - before < 16_384, "the gateway held the oversized heads"
    for head, chunk in ((big, 65_536), (big, 100), (many, 1000), (url, 65_536)):
        answer = _raw(stack.port, head, chunk)
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:300]
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_header_too_large" and error["type"] == "invalid_request_error"
    fine = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 7000 + b"\r\n\r\n"
    answer = _raw(stack.port, fine * 3 + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 500)
    assert answer.count(b"HTTP/1.1 200 OK") == 4, answer[:500]
    post = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000\r\nConnection: close\r\n\r\n" + b" " * 20000)  # a body past the bound: not a head
    assert _raw(stack.port, post).startswith(b"HTTP/1.1 400 ")  # blank JSON: the app's own 400
    # A chunked body of many small chunks (framing bytes are not its head), with a short trailer.
    small_chunks = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n" + b"1\r\n \r\n" * 20_000 + b"0\r\nX-T: a\r\n\r\n")
    answer = _raw(stack.port, small_chunks, 4096)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
