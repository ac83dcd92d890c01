"""The upstream engine's two transports (engines/upstream_http.py) in process, against scripted servers on
a thread: the default one (aiohttp, HTTP/1.1) and ``--upstream-http2``'s (httpx with h2), each through
``UpstreamBackend.run``. What they send, a pooled connection reused, a cancelled job's connection closed
(never pooled half-read), a read timeout that is a failed connection (never the job's deadline), and
HTTP/2 spoken where the upstream's TLS offers it (an h2-only server, ALPN ``h2``, a private CA)."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engines.backend import JobRejected
from engines.contract.messages import Job
from engines.upstream import UpstreamBackend, UpstreamSettings
from tests.harness import ThreadedServer, free_port
from tests.unit.test_upstream import Out

SSE = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "tok "}}]},
    {"choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
)) + b"data: [DONE]\n\n"


def job(model: str, deadline_s: float = 20) -> Job:
    """A streamed chat job (the upstream is asked to stream; the scripted upstreams always do)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    return Job(id=f"job-{model}", kind="chat", model=model, body=body, reply_to="",
               deadline_ms=int((time.time() + deadline_s) * 1000))


async def refusal(s: UpstreamSettings, model: str = "ok") -> JobRejected:
    """What a backend with settings ``s`` answers one job of ``model`` with (it must refuse it)."""
    backend = UpstreamBackend(s)
    await backend.start()
    try:
        with pytest.raises(JobRejected) as failed:
            await backend.run(job(model), Out())
    finally:
        await backend.close()
    return failed.value


def text(out: Out) -> str:
    return "".join(d.text for choices, _, _ in out.deltas for d in choices)


class Http1Upstream(ThreadedServer):
    """HTTP/1.1 with keep-alive. Its answer by the request's model: ``ok`` the stream (chunked, one write),
    ``hang`` one token then silence, ``silent`` the headers then silence. It keeps each request's headers
    (lower-cased names) and body, and counts connections opened and closed by the client."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.opened = self.closed_by_client = 0
        super().__init__()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            while head := await r.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")[1:]
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
                body = json.loads(await r.readexactly(int(headers.get("content-length", "0"))))
                self.requests.append((headers, body))
                start = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                if body["model"] == "ok":
                    w.write(start + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SSE), SSE))
                    continue
                if body["model"] == "gzip":  # a compressed answer though asked for identity: newlines
                    bomb = gzip.compress(b"\n" * 4_000_000)
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(bomb), bomb))
                    continue
                first = SSE.split(b"\n\n")[0] + b"\n\n"
                w.write(start + (b"%x\r\n%s\r\n" % (len(first), first) if body["model"] == "hang" else b""))
                await w.drain()
                if not await r.read(1):  # the client closed it
                    self.closed_by_client += 1
                return
        except asyncio.IncompleteReadError:
            self.closed_by_client += 1
        except ConnectionError:
            pass
        finally:
            w.close()


@pytest.fixture
def http1() -> Iterator[Http1Upstream]:
    server = Http1Upstream()
    yield server
    server.stop()


def settings(base_url: str, **kw: Any) -> UpstreamSettings:
    return UpstreamSettings(base_url=base_url, served_names=["ok"], api_key="sk-test", headers={"X-Team": "red"},
                            retries=0, **kw)


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_the_request_carries_the_key_and_headers_asks_no_compression_and_reuses_its_connection(
        http1: Http1Upstream, http2: bool) -> None:
    backend = UpstreamBackend(settings(f"http://127.0.0.1:{http1.port}/v1", http2=http2))
    await backend.start()
    try:
        for _ in range(3):
            out = Out()
            await backend.run(job("ok"), out)
            assert text(out) == "tok tok " and out.usage is not None and out.usage.completion_tokens == 2
    finally:
        await backend.close()
    headers, body = http1.requests[0]
    assert headers["authorization"] == "Bearer sk-test" and headers["x-team"] == "red"
    assert headers["accept-encoding"] == "identity" and headers["content-type"] == "application/json"
    assert body["model"] == "ok" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert len(http1.requests) == 3
    # aiohttp: one keep-alive connection for the three (the stream's last chunk came with [DONE]). httpx
    # closes an answer not read to its end (the relay stops at [DONE]): over HTTP/1.1 a connection each;
    # over HTTP/2 (what --upstream-http2 is for) that ends only the stream.
    assert http1.opened == (3 if http2 else 1)


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_a_cancelled_job_closes_its_connection_which_is_never_pooled(http1: Http1Upstream,
                                                                          http2: bool) -> None:
    backend = UpstreamBackend(settings(f"http://127.0.0.1:{http1.port}/v1", http2=http2))
    await backend.start()
    try:
        out = Out()
        running = asyncio.create_task(backend.run(job("hang"), out))
        async with asyncio.timeout(10):
            while not out.deltas:
                await asyncio.sleep(0.01)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert backend.aborted_requests == 1 and backend.unfinished_requests() == 0
        async with asyncio.timeout(5):
            while not http1.closed_by_client:
                await asyncio.sleep(0.01)
        out = Out()
        await backend.run(job("ok"), out)  # on a new connection: the half-read one was not pooled
        assert text(out) == "tok tok " and http1.opened == 2
    finally:
        await backend.close()


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_a_read_timeout_is_an_unreachable_upstream_not_the_job_s_deadline(http1: Http1Upstream,
                                                                               http2: bool) -> None:
    backend = UpstreamBackend(settings(f"http://127.0.0.1:{http1.port}/v1", http2=http2, read_timeout_s=0.3))
    await backend.start()
    try:
        began = time.monotonic()
        with pytest.raises(JobRejected) as failed:
            await backend.run(job("silent", deadline_s=20), Out())
        assert failed.value.status == 503 and failed.value.code == "model_unavailable", failed.value.message
        assert time.monotonic() - began < 5
    finally:
        await backend.close()


async def test_a_refused_connection_names_the_failure_never_the_url() -> None:
    from tests.harness import free_port

    failed = await refusal(settings(f"http://127.0.0.1:{free_port()}/v1/secret-path"))
    assert failed.status == 503 and "ConnectionRefusedError" in failed.message
    assert "secret-path" not in failed.message and "127.0.0.1" not in failed.message


class H2Upstream(ThreadedServer):
    """HTTP/2 only, over TLS offering only ``h2`` by ALPN: a client speaking HTTP/1.1 gets nothing back.
    Answers every request with :data:`SSE`; keeps each request's pseudo-headers and body."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["h2"])
        super().__init__(ssl=ctx)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        w.write(conn.data_to_send())
        heads: dict[int, dict[str, str]] = {}
        bodies: dict[int, bytes] = {}
        try:
            while data := await r.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        heads[event.stream_id] = dict(event.headers)
                        bodies[event.stream_id] = b""
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self.requests.append((heads[event.stream_id], json.loads(bodies[event.stream_id])))
                        conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "text/event-stream")])
                        conn.send_data(event.stream_id, SSE, end_stream=True)
                w.write(conn.data_to_send())
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=localhost",
                           "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, timeout=60,
                          check=False)
    assert made.returncode == 0, made.stderr
    return cert, key


async def test_upstream_http2_speaks_http2_where_the_upstream_s_tls_offers_it(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    server = H2Upstream(cert, key)
    backend = UpstreamBackend(settings(f"https://127.0.0.1:{server.port}/v1", http2=True, ca_bundle=str(cert)))
    await backend.start()
    try:
        out = Out()
        await backend.run(job("ok"), out)
        assert text(out) == "tok tok " and out.usage is not None and out.usage.prompt_tokens == 3
    finally:
        await backend.close()
        server.stop()
    headers, body = server.requests[0]
    assert headers[":method"] == "POST" and headers[":path"] == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-test" and body["model"] == "ok"


async def test_tls_is_verified_by_both_transports(tls_cert: tuple[Path, Path]) -> None:
    """Without the CA bundle the private certificate is refused, and the failure says so."""
    cert, key = tls_cert
    server = H2Upstream(cert, key)
    try:
        for http2 in (False, True):
            failed = await refusal(settings(f"https://127.0.0.1:{server.port}/v1", http2=http2))
            assert failed.status == 503, failed.message
            assert ("certificate" if not http2 else "ConnectError") in failed.message
        assert server.requests == []
    finally:
        server.stop()


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_a_compressed_answer_is_refused_never_inflated(http1: Http1Upstream, http2: bool,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Asked for ``identity``, an upstream that compresses anyway is a misconfigured one (a 502,
    logged, not retried): its body is never inflated (4 MB of newlines in a few KiB on the wire, a
    bomb for an engine that inflates it)."""
    s = msgspec.structs.replace(settings(f"http://127.0.0.1:{http1.port}/v1", http2=http2), retries=2)
    refused = await refusal(s, "gzip")
    assert (refused.status, refused.code) == (502, "engine_error")
    assert len(http1.requests) == 1 and "Content-Encoding" in caplog.text


async def test_the_http2_transport_ignores_proxy_settings(http1: Http1Upstream,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream is reached directly, as the default transport does: a proxy from the environment
    would see the request, its key included."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{free_port()}")
    backend = UpstreamBackend(settings(f"http://127.0.0.1:{http1.port}/v1", http2=True))
    await backend.start()
    try:
        out = Out()
        await backend.run(job("ok"), out)
    finally:
        await backend.close()
    assert text(out) == "tok tok " and len(http1.requests) == 1
