"""The upstream engine's HTTP client: one keep-alive pool to the upstream, behind a seam small enough
that ``engines.upstream`` never names the library underneath.

Two transports, one shape (:class:`Transport`): ``stream(method, path, json=...)`` is an async context
manager yielding an :class:`Answer` (``status_code``, case-insensitive ``headers``, ``aiter_bytes()``),
and every way the connection fails (refused, cut, a connect or read timeout, TLS refused) is one
:class:`TransportFailed`, whose text names the failure and never the URL.

- :class:`AiohttpTransport`, the default: HTTP/1.1, what vLLM's, SGLang's and TGI's servers speak.
  aiohttp spends ~85 us of CPU per streamed request where httpx spends ~2,000 (DEVELOPERS.md,
  "The upstream engine's HTTP client"), and the engine's throughput is its client's CPU.
- :class:`HttpxTransport` (``--upstream-http2``): httpx with ``h2``, HTTP/2 where the upstream's TLS
  offers it by ALPN (HTTP/1.1 otherwise, and always on plain ``http://``).

Both read raw bytes (``engines.upstream_relay`` bounds the lines and error bodies), ask for no
compression (``Accept-Encoding: identity``: nothing inflates behind those bounds), keep at most
``max_concurrency`` connections, wait for a free one without a limit of their own (the job's deadline
bounds the wait), and close, never pool, a connection whose answer was left half-read (a cancelled job).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgspec
from yarl import URL

from engines.backend import JobRejected

if TYPE_CHECKING:
    from engines.upstream import UpstreamSettings

log = logging.getLogger("conduit.engine")

#: The headers every request carries besides the operator's: no compression (the bounds on what is
#: read apply to the bytes that arrive; an inflated body would escape them).
_FIXED = {"Accept-Encoding": "identity"}
_JSON = {"Content-Type": "application/json"}


class TransportFailed(Exception):
    """The connection to the upstream failed (refused, cut, a connect or read timeout, TLS refused);
    the text names how, never the URL."""


class Answer(Protocol):
    """The upstream's answer, its body not yet read."""

    status_code: int
    #: Case-insensitive (``Retry-After`` is read as ``retry-after``).
    headers: Mapping[str, str]

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (no decoding, no line buffering)."""
        ...


class Transport(Protocol):
    """One keep-alive pool to the upstream's base URL."""

    def stream(self, method: str, path: str, *, json: Any = None,
               read_timeout_s: float | None = None) -> contextlib.AbstractAsyncContextManager[Answer]:
        """Send a request (``path`` relative to the base URL; ``json`` the body, encoded once) and yield its
        answer; :class:`TransportFailed` for a failed connection, while sending or while reading.
        ``read_timeout_s``: this request's longest silence instead of the settings' (a serverless
        endpoint waking: ``engines.upstream_wake``)."""
        ...

    async def aclose(self) -> None:
        """Close every connection."""


def transport(settings: UpstreamSettings) -> Transport:
    """The transport the settings ask for (``http2``: httpx with h2; else aiohttp). Call in a running loop."""
    return HttpxTransport(settings) if settings.http2 else AiohttpTransport(settings)


def _headers(settings: UpstreamSettings) -> dict[str, str]:
    headers = dict(settings.headers)
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return {**headers, **_FIXED}


def _tls(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    """A verifying context (the CA bundle's, or the system's), or False (``--upstream-insecure``)."""
    return ssl.create_default_context(cafile=settings.ca_bundle or None) if settings.verify_tls else False


class _AiohttpAnswer:
    __slots__ = ("_content", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status_code = response.status
        self.headers = response.headers
        self._content = response.content

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._content.iter_any()


def identity(headers: Mapping[str, str]) -> None:
    """Refuse an answer whose body is compressed though ``identity`` was asked: a misconfigured
    upstream (or a proxy before it), never tried again, never inflated (a few KiB can inflate to
    gigabytes, and inflating blocks the engine's loop)."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        log.error("the upstream answered with Content-Encoding %r though asked for identity: refused (check the "
                  "upstream or the proxy before it)", encoding[:40])
        raise JobRejected("The model's upstream server answered in an encoding Conduit did not ask for.", status=502,
                          code="engine_error", type="server_error")


def _failed(exc: BaseException) -> TransportFailed:
    """aiohttp's failure as :class:`TransportFailed` (its own text may name the host; this names the kind)."""
    why = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        why += ": the upstream's TLS certificate was not verified (--upstream-ca-bundle)"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        why += f" ({type(exc.os_error).__name__})"
    return TransportFailed(why)


class AiohttpTransport:
    """HTTP/1.1 over aiohttp (the default)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        base = settings.base_url.rstrip("/") + "/"
        self._urls = {path: URL(base + path) for path in ("chat/completions", "completions", "models")}
        self._base = base
        self._connect_s = settings.connect_timeout_s
        connector = aiohttp.TCPConnector(limit=settings.max_concurrency, limit_per_host=0, ssl=_tls(settings))
        # No total and no pool timeout: the job's deadline (asyncio.timeout_at in run) bounds both.
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=settings.connect_timeout_s,
                                        sock_read=settings.read_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, headers=_headers(settings), timeout=timeout,
                                              auto_decompress=False, trust_env=False, raise_for_status=False)

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        return url if url is not None else URL(self._base + path)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, json: Any = None,
                     read_timeout_s: float | None = None) -> AsyncIterator[Answer]:
        data = None if json is None else msgspec.json.encode(json)
        extra: dict[str, Any] = {}
        if read_timeout_s is not None:
            extra["timeout"] = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self._connect_s,
                                                     sock_read=read_timeout_s)
        try:
            response = await self._session.request(method, self._url(path), data=data,
                                                   headers=_JSON if data is not None else None,
                                                   allow_redirects=False, **extra)
        except (aiohttp.ClientError, TimeoutError) as exc:  # aiohttp's timeouts are TimeoutErrors too
            raise _failed(exc) from None
        try:
            identity(response.headers)
            yield _AiohttpAnswer(response)
        except (aiohttp.ClientError, TimeoutError) as exc:  # while the body was read
            response.close()
            raise _failed(exc) from None
        except BaseException:
            response.close()  # left half-read (a cancelled job, a bound hit): closed, never pooled
            raise
        # Read to its end, the connection goes back to the pool; not (a [DONE] before the last chunk), closed.
        response.release()

    async def aclose(self) -> None:
        await self._session.close()


class HttpxTransport:
    """httpx with h2 (``--upstream-http2``): HTTP/2 where the upstream's TLS offers it."""

    def __init__(self, settings: UpstreamSettings) -> None:
        import httpx

        pool = httpx.Limits(max_connections=settings.max_concurrency,
                            max_keepalive_connections=settings.max_concurrency)
        timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s, pool=None)
        self._connect_s = settings.connect_timeout_s
        self._timeout = httpx.Timeout
        self._errors = (httpx.TransportError, httpx.StreamError)
        self._client = httpx.AsyncClient(base_url=settings.base_url, headers=_headers(settings), limits=pool,
                                         timeout=timeout, verify=_tls(settings), http2=True, follow_redirects=False,
                                         trust_env=False)  # as aiohttp's: an environment's proxy sees no key

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, json: Any = None,
                     read_timeout_s: float | None = None) -> AsyncIterator[Answer]:
        data = None if json is None else msgspec.json.encode(json)
        extra: dict[str, Any] = {}
        if read_timeout_s is not None:
            extra["timeout"] = self._timeout(read_timeout_s, connect=self._connect_s, pool=None)
        try:
            async with self._client.stream(method, path, content=data, headers=_JSON if data is not None else None,
                                           **extra) as response:
                identity(response.headers)
                yield response
        except self._errors as exc:
            raise TransportFailed(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._client.aclose()
