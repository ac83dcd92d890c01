"""``conduit engine --kind upstream``'s flags and the settings they make (``engines.upstream``'s
``UpstreamSettings``). No secret ever comes from a flag's value (a command line is public: ``ps``):
the API key from CONDUIT_UPSTREAM_API_KEY or ``--upstream-api-key-file``, secret headers from
``--upstream-header-file``; a base URL with userinfo or a query string is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from engines.upstream import UpstreamSettings

#: A header's name (RFC 9110's token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Headers the HTTP client writes itself (the request's framing, its host, its connection, its
#: encoding): one an operator set would contradict them.
_CLIENT_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                             "te", "trailer", "accept-encoding", "content-type"})


def _number(kind: type[int | float], low: float, *, above: bool) -> Any:
    """An argparse type: a finite number above ``low`` (``above``) or at least ``low``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > low if above else value >= low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number {'above' if above else 'of at least'} {low:g}, "
                                             f"not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_upstream_flags(parser: argparse.ArgumentParser) -> None:
    """The ``upstream`` group of ``conduit engine``'s flags."""
    up = parser.add_argument_group("upstream", "--kind upstream: the server jobs are forwarded to. Its API key "
                                               "comes from CONDUIT_UPSTREAM_API_KEY or --upstream-api-key-file, "
                                               "never a flag")
    up.add_argument("--base-url", help="the upstream's OpenAI base URL, /v1 included (http://vllm:8000/v1); no "
                                       "user:password@ and no ?query (secrets go in the key or header file)")
    up.add_argument("--upstream-model", help="the upstream's name of the model (default: --served-name)")
    up.add_argument("--models", choices=["auto"], help="auto: serve every model the upstream's /v1/models lists, "
                                                        "under its own name, re-read every --models-refresh-s")
    up.add_argument("--models-refresh-s", type=_number(float, 0, above=True), default=30.0)
    up.add_argument("--upstream-models-max", type=_number(int, 1, above=False), default=32,
                    help="with --models auto, the most models served (the first, sorted; a warning names the "
                         "rest): each has its own job reader and Redis connection")
    up.add_argument("--upstream-api-key-file", help="a file holding the upstream's API key")
    up.add_argument("--upstream-header", action="append", default=[], metavar="'NAME: VALUE'",
                    help="a header sent with every upstream request (repeatable); for non-secret values only "
                         "(a command line is public): put secret ones in --upstream-header-file")
    up.add_argument("--upstream-header-file", metavar="FILE",
                    help="headers sent with every upstream request, one 'Name: value' a line (blank lines and "
                         "# comments skipped)")
    up.add_argument("--upstream-connect-timeout-s", type=_number(float, 0, above=True), default=10.0)
    up.add_argument("--upstream-read-timeout-s", type=_number(float, 0, above=True), default=120.0,
                    help="the longest silence between two chunks of the upstream's answer")
    up.add_argument("--upstream-ca-bundle", help="a PEM CA bundle to verify the upstream's certificate with")
    up.add_argument("--upstream-insecure", action="store_true",
                    help="do not verify the upstream's TLS certificate (verified by default)")
    up.add_argument("--upstream-kinds", default="chat,completion", metavar="KIND[,KIND]",
                    help="the job kinds the upstream serves, announced to the gateway, which sends the engine "
                         "only those: any of chat, completion, image (images/generations) (default: "
                         "chat,completion; an upstream of images only: image)")
    up.add_argument("--upstream-http2", action="store_true",
                    help="talk to the upstream through httpx with h2: HTTP/2 where its TLS offers it (ALPN), "
                         "HTTP/1.1 otherwise and always over http://. For upstreams that speak HTTP/2 over TLS; "
                         "vLLM's, SGLang's and TGI's servers speak HTTP/1.1, which the default client (aiohttp) "
                         "serves with about a twentieth of httpx's CPU per request")
    up.add_argument("--upstream-retries", type=_number(int, 0, above=False), default=3,
                    help="tries after the first for a failure before any output (connection, timeout, 5xx, 429)")
    up.add_argument("--upstream-serverless", action="store_true",
                    help="the upstream scales to zero (a serverless endpoint): its models are announced cold while "
                         "it is believed asleep (at start, after --upstream-idle-s without an answer), and while "
                         "cold, refusals before output (connection, timeout, 503, 429) are tried again, at most 5 s "
                         "apart, for up to --upstream-cold-start-s instead of --upstream-retries times")
    up.add_argument("--upstream-cold-start-s", type=_number(float, 0, above=True), default=300.0,
                    help="with --upstream-serverless, how long a wake may take (a request's tries and its first "
                         "byte's wait while cold)")
    up.add_argument("--upstream-idle-s", type=_number(float, 0, above=True), default=300.0,
                    help="with --upstream-serverless, how long without an answer before the endpoint is taken to "
                         "have scaled down again (cold)")


def _header(line: str, where: str) -> tuple[str, str]:
    """``Name: value``; ``where`` names the flag, or the file's line (whose text may be a secret: never shown)."""
    name, sep, value = line.partition(":")
    if not sep or not _HEADER_NAME.fullmatch(name.strip()) or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{where} takes 'Name: value'" + (f", not {line!r}" if where == "--upstream-header" else ""))
    if name.strip().lower() in _CLIENT_HEADERS:
        raise ValueError(f"{where}: {name.strip()} is the HTTP client's own header")
    return name.strip(), value.strip()


#: The job kinds an upstream engine can forward (``--upstream-kinds``).
UPSTREAM_KINDS = ("chat", "completion", "image")


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",")]
    if not text.strip() or any(k not in UPSTREAM_KINDS for k in kinds):
        raise ValueError(f"--upstream-kinds takes some of {', '.join(UPSTREAM_KINDS)}, comma-separated, not {text!r}")
    return sorted(set(kinds))


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--base-url must be an http:// or https:// URL (http://vllm:8000/v1)")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError("--base-url must carry no user:password@, ?query or #fragment (it is logged and shown "
                         "by ps): put the key in CONDUIT_UPSTREAM_API_KEY or --upstream-api-key-file, other "
                         "secrets in --upstream-header-file")
    return url


def upstream_settings(args: argparse.Namespace) -> UpstreamSettings:
    """An upstream engine's settings from ``conduit engine``'s flags and the environment (its key:
    CONDUIT_UPSTREAM_API_KEY or ``--upstream-api-key-file``, never a flag's value). Raises ValueError
    naming what is wrong."""
    from engines.upstream import UpstreamSettings

    if not args.base_url:
        raise ValueError("--kind upstream needs --base-url (the upstream's OpenAI base URL, e.g. http://vllm:8000/v1)")
    base_url = _base_url(args.base_url)
    auto = args.models == "auto"
    if not auto and not args.served_name:
        raise ValueError("--kind upstream needs --served-name (the model name clients use) or --models auto")
    if auto and args.upstream_model:
        raise ValueError("--upstream-model names one model; with --models auto each model keeps the upstream's name")
    if auto and args.upstream_serverless:
        # It would read the endpoint's /v1/models to start (refused while it sleeps: the engine never
        # announces the model) and again every --models-refresh-s (keeping it awake, and billed).
        raise ValueError("--upstream-serverless needs --served-name: --models auto reads the upstream's models "
                         "at start and periodically, which a sleeping endpoint refuses and a polled one never sleeps")
    if args.upstream_http2 and importlib.util.find_spec("h2") is None:
        raise ValueError("--upstream-http2 needs the h2 package (the `upstream` extra installs it)")
    key = os.environ.get("CONDUIT_UPSTREAM_API_KEY", "")
    if args.upstream_api_key_file:
        try:
            key = Path(args.upstream_api_key_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --upstream-api-key-file: {exc.strerror}") from None
    headers = dict(_header(h, "--upstream-header") for h in args.upstream_header)
    if args.upstream_header_file:
        try:
            lines = Path(args.upstream_header_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --upstream-header-file: {exc.strerror}") from None
        headers.update(_header(h, f"--upstream-header-file's line {n}") for n, h in enumerate(lines, 1)
                       if h.strip() and not h.lstrip().startswith("#"))
    return UpstreamSettings(
        base_url=base_url, served_names=[] if auto else [args.served_name], upstream_model=args.upstream_model or "",
        models_auto=auto, models_refresh_s=args.models_refresh_s, models_max=args.upstream_models_max, api_key=key,
        headers=headers, connect_timeout_s=args.upstream_connect_timeout_s, read_timeout_s=args.upstream_read_timeout_s,
        verify_tls=not args.upstream_insecure, ca_bundle=args.upstream_ca_bundle or "",
        max_concurrency=args.max_concurrency or 64, http2=args.upstream_http2, retries=args.upstream_retries,
        kinds=_kinds(args.upstream_kinds), serverless=args.upstream_serverless, cold_start_s=args.upstream_cold_start_s,
        idle_s=args.upstream_idle_s)
