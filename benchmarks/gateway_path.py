#!/usr/bin/env python3
"""gateway_path.py - a self-contained load generator for Conduit's gateway path.

Measures one or more running OpenAI-compatible targets (Conduit in front of the
synthetic engine, and optionally a direct backend as the baseline):

* non-streaming chat completions (``max_tokens`` 16), closed loop, fixed duration,
  at concurrency 1, 16, 64, 256: requests/s and p50/p90/p99 latency;
* streaming chat completions (``max_tokens`` 64), N concurrent streams (default 100),
  closed loop: relayed tokens/s (SSE ``data:`` events per second, ``[DONE]`` not
  counted), content chunks per stream, TTFT and end-to-end latency;
* the RSS/PSS of the process tree listening on the target's port (from /proc), and
  the CPU used by that tree, by any extra processes named with ``--cpu-pid`` (the
  engine, Redis) and by this load generator, per run.

Every request is checked: a non-200 status, a connection/protocol error, a stream
without ``data: [DONE]`` or with fewer content chunks than ``max_tokens`` are each
counted, and printed in the table (``non2xx/err`` and ``inc/short``).

Stdlib only (uvloop is used when importable): the HTTP/1.1 client is a small
keep-alive client on asyncio streams, so it needs neither aiohttp nor the bench
harness in ../shared/bench, and costs less CPU per request than aiohttp on a small
machine where the load generator shares the cores with the target.

    python benchmarks/gateway_path.py -t conduit=http://127.0.0.1:8000/v1 \
        [-t mock=http://127.0.0.1:8100/v1] [--cpu-pid engine=1234 --cpu-pid redis=1230] \
        [--quick] [-o results.json]

A target is LABEL=BASE_URL[,model=NAME][,key=API_KEY][,api=responses] (BASE_URL as an OpenAI
SDK's base_url; ``api=responses``: ``POST /responses`` instead of chat completions, the same
prompt and token counts). Prints a table and writes JSON (``-o``). Linux only (for /proc).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

CLK = os.sysconf("SC_CLK_TCK")
CONTENT_RE = re.compile(rb'"content"\s*:\s*"[^"]')
RESPONSES_CONTENT_RE = re.compile(rb'^\{"type":"response\.output_text\.delta"')
#: (The synthetic engine stops at the limit it is given: its responses end "incomplete".)
RESPONSES_END = re.compile(rb'^\{"type":"response\.(?:completed|incomplete)"')


# ---------------------------------------------------------------------------------
# /proc helpers: the process tree listening on a port, its CPU time and memory
# ---------------------------------------------------------------------------------
def _listen_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[3] == "0A" and int(p[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(p[9])
        except OSError:
            pass
    return inodes


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime in ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree_of(roots: set[int]) -> list[int]:
    """The given pids and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st:
            children.setdefault(st[0], []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(children.get(p, []))
    return sorted(out)


def pids_for_port(port: int) -> list[int]:
    """The processes holding a listening socket on ``port`` and their descendants."""
    targets = {f"socket:[{i}]" for i in _listen_inodes(port)}
    if not targets:
        return []
    roots: set[int] = set()
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    roots.add(pid)
                    break
            except OSError:
                continue
    return tree_of(roots)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st:
            total += st[1]
    return total / CLK


def mem_of(pids: list[int]) -> dict:
    procs = []
    for pid in pids:
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1])
        except OSError:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss = pss = int(line.split()[1])
            except OSError:
                continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
        except OSError:
            cmd = "?"
        procs.append({"pid": pid, "rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1), "cmd": cmd})
    return {
        "processes": procs,
        "rss_mib_sum": round(sum(p["rss_mib"] for p in procs), 1),
        "pss_mib_sum": round(sum(p["pss_mib"] for p in procs), 1),
        "rss_mib_max": round(max((p["rss_mib"] for p in procs), default=0.0), 1),
    }


def sys_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------
# a minimal HTTP/1.1 keep-alive client
# ---------------------------------------------------------------------------------
class ProtocolError(Exception):
    pass


class Target:
    #: "chat" (chat completions) or "responses" (``POST /responses``: ``input``, ``max_output_tokens``,
    #: its events; a stream's content is its ``response.output_text.delta`` events, its end its terminal event).
    api = "chat"

    def __init__(self, spec: str, model: str, key: str) -> None:
        label, sep, rest = spec.partition("=")
        if not sep or not label:
            raise SystemExit(f"bad target {spec!r}: want LABEL=BASE_URL[,model=NAME][,key=KEY]")
        parts = rest.split(",")
        self.label = label
        self.base_url = parts[0].rstrip("/")
        self.model, self.key = model, key
        for p in parts[1:]:
            k, _, v = p.partition("=")
            if k == "model":
                self.model = v
            elif k == "key":
                self.key = v
            elif k == "api" and v in ("chat", "responses"):
                self.api = v
            else:
                raise SystemExit(f"bad target option {p!r}")
        u = urlsplit(self.base_url)
        if u.scheme != "http":
            raise SystemExit(f"{self.base_url}: only http:// targets are supported")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.path = (u.path or "") + ("/responses" if self.api == "responses" else "/chat/completions")
        #: What a whole answer holds, what a stream's content event and its end look like.
        self.answer, self.content_re, self.end = (b'"output"', RESPONSES_CONTENT_RE, RESPONSES_END) \
            if self.api == "responses" else (b'"choices"', CONTENT_RE, b"[DONE]")

    def request(self, max_tokens: int, stream: bool) -> bytes:
        prompt = "Say hello in one short sentence."
        fields = {"input": prompt, "max_output_tokens": max_tokens} if self.api == "responses" else \
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        body = json.dumps({"model": self.model, **fields, "stream": stream}, separators=(",", ":")).encode()
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: keep-alive"]
        if stream:
            head.append("Accept: text/event-stream")
        if self.key:
            head.append(f"Authorization: Bearer {self.key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Conn:
    """One keep-alive connection; reopened after an error or ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure(self) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def head(self, req: bytes) -> tuple[int, int | None, bool, bool]:
        """Send ``req``; read the status line and headers: (status, length, chunked, close)."""
        await self.ensure()
        assert self.writer is not None and self.reader is not None
        self.writer.write(req)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError) as e:
            raise ProtocolError(f"bad status line {lines[0][:80]!r}") from e
        length: int | None = None
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        return status, length, chunked, close

    async def body(self, length: int | None, chunked: bool):
        """Yield the body's pieces as they arrive (one per HTTP chunk)."""
        assert self.reader is not None
        if chunked:
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        elif length is not None:
            if length:
                yield await self.reader.readexactly(length)
        else:  # read to EOF
            while chunk := await self.reader.read(65536):
                yield chunk
            self.close()


# ---------------------------------------------------------------------------------
# the two load shapes
# ---------------------------------------------------------------------------------
def pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return round(sorted_vals[i], 3)


async def bounded(coro, timeout: float):
    """``await coro`` with a timeout; asyncio.timeout (3.11+) costs no extra task per request."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await coro
    return await asyncio.wait_for(coro, timeout)


async def closed_loop(t: Any, conc: int, one: Any, w0: float, w1: float, timeout: float,
                      errs: dict[str, int]) -> None:
    """``conc`` clients, each on its own keep-alive connection, calling ``one(conn)`` until w1."""

    async def worker() -> None:
        c = Conn(t.host, t.port)
        try:
            while time.perf_counter() < w1:
                try:
                    await bounded(one(c), timeout)
                except asyncio.TimeoutError:
                    c.close()
                    if w0 <= time.perf_counter() < w1:
                        errs["timeout"] += 1
        finally:
            c.close()

    await asyncio.gather(*(worker() for _ in range(conc)))


NET_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
              ProtocolError, ValueError)


async def run_nonstream(t: Target, conc: int, duration: float, warmup: float, max_tokens: int,
                        timeout: float) -> dict:
    req = t.request(max_tokens, stream=False)
    lat: list[float] = []
    errs = {"non2xx": 0, "conn": 0, "timeout": 0, "bad_body": 0}
    statuses: dict[str, int] = {}
    ok = 0
    t_start = time.perf_counter()
    w0, w1 = t_start + warmup, t_start + warmup + duration

    async def one(c: Conn) -> None:
        nonlocal ok
        t0 = time.perf_counter()
        measured = w0 <= t0 < w1
        try:
            status, length, chunked, close = await c.head(req)
            data = b"".join([p async for p in c.body(length, chunked)])
            if close:
                c.close()
        except asyncio.TimeoutError:
            c.close()
            if measured:
                errs["timeout"] += 1
            return
        except NET_ERRORS:
            c.close()
            if measured:
                errs["conn"] += 1
            await asyncio.sleep(0.01)
            return
        t1 = time.perf_counter()
        if not measured:
            return
        if status != 200:
            errs["non2xx"] += 1
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            return
        if t.answer not in data:
            errs["bad_body"] += 1
            return
        ok += 1
        lat.append((t1 - t0) * 1000.0)

    await closed_loop(t, conc, one, w0, w1, timeout, errs)
    lat.sort()
    return {
        "kind": "nonstream", "conc": conc, "max_tokens": max_tokens, "window_s": duration,
        "requests_ok": ok, "rps": round(ok / duration, 2),
        "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
        "mean_ms": round(sum(lat) / len(lat), 3) if lat else None, "max_ms": round(lat[-1], 3) if lat else None,
        "errors": errs, "statuses": statuses,
    }


async def run_stream(t: Target, conc: int, duration: float, warmup: float, max_tokens: int,
                     timeout: float) -> dict:
    req = t.request(max_tokens, stream=True)
    ttft: list[float] = []
    e2e: list[float] = []
    errs = {"non2xx": 0, "conn": 0, "timeout": 0, "incomplete": 0, "short": 0}
    statuses: dict[str, int] = {}
    counts = {"ok": 0, "window_events": 0, "window_content": 0, "content_ok": 0}
    t_start = time.perf_counter()
    w0, w1 = t_start + warmup, t_start + warmup + duration

    async def one(c: Conn) -> None:
        t0 = time.perf_counter()
        measured = w0 <= t0 < w1
        first: float | None = None
        done = False
        content = 0
        buf = b""
        try:
            status, length, chunked, close = await c.head(req)
            if status != 200:
                async for _ in c.body(length, chunked):
                    pass
                if close:
                    c.close()
                if measured:
                    errs["non2xx"] += 1
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                return
            async for piece in c.body(length, chunked):
                now = time.perf_counter()
                buf += piece
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    if first is None:
                        first = now
                    payload = line[5:].strip()
                    if payload == b"[DONE]" if t.api == "chat" else t.end.match(payload) is not None:
                        done = True
                        continue
                    is_content = t.content_re.search(payload) is not None
                    content += is_content
                    if w0 <= now < w1:
                        counts["window_events"] += 1
                        counts["window_content"] += is_content
            if close:
                c.close()
        except NET_ERRORS:
            c.close()
            if measured:
                errs["conn"] += 1
            await asyncio.sleep(0.01)
            return
        t1 = time.perf_counter()
        if not measured:
            return
        if not done:
            errs["incomplete"] += 1
            return
        if content < max_tokens:
            errs["short"] += 1
        counts["ok"] += 1
        counts["content_ok"] += content
        ttft.append(((first or t1) - t0) * 1000.0)
        e2e.append((t1 - t0) * 1000.0)

    await closed_loop(t, conc, one, w0, w1, timeout, errs)
    drain = time.perf_counter() - w1
    ttft.sort()
    e2e.sort()
    ok = counts["ok"]
    return {
        "kind": "stream", "conc": conc, "max_tokens": max_tokens, "window_s": duration, "drain_s": round(drain, 3),
        "streams_ok": ok, "streams_per_s": round(ok / duration, 2),
        "tokens_per_s": round(counts["window_events"] / duration, 1),
        "content_tokens_per_s": round(counts["window_content"] / duration, 1),
        "content_per_stream": round(counts["content_ok"] / ok, 2) if ok else 0,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
        "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
        "errors": errs, "statuses": statuses,
    }


# ---------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------
async def preflight(t: Target, timeout: float) -> str | None:
    """None when one JSON and one streamed request succeed, else what went wrong."""
    c = Conn(t.host, t.port)
    try:
        for stream in (False, True):
            status, length, chunked, close = await asyncio.wait_for(c.head(t.request(4, stream)), timeout)
            data = b""
            async for p in c.body(length, chunked):
                data += p
            if close:
                c.close()
            if status != 200:
                return f"HTTP {status}: {data[:300]!r}"
            ended = b"data: [DONE]" in data if t.api == "chat" else any(
                t.end.match(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: "))
            if stream and not ended:
                return f"stream without its end: {data[-300:]!r}"
    except Exception as e:  # noqa: BLE001 - report anything
        return f"{type(e).__name__}: {e}"
    finally:
        c.close()
    return None


def measured(fn):
    """Run a load coroutine with CPU accounting of the target tree, extra pids and ourselves."""

    async def wrapper(t: Target, extra: dict[str, int], *args) -> dict:
        tree = pids_for_port(t.port)
        c_t0 = cpu_seconds(tree)
        c_x0 = {k: cpu_seconds([p]) for k, p in extra.items()}
        c_l0 = self_cpu()
        s0 = sys_jiffies()
        w0 = time.perf_counter()
        res = await fn(t, *args)
        wall = time.perf_counter() - w0
        s1 = sys_jiffies()
        tree2 = pids_for_port(t.port)
        # a worker that exited during the run would make the difference negative; keep the sum over both lists
        c_t1 = cpu_seconds(sorted(set(tree) | set(tree2)))
        res["wall_s"] = round(wall, 3)
        res["cpu_pct"] = {"target": round((c_t1 - c_t0) / wall * 100, 1),
                          **{k: round((cpu_seconds([p]) - c_x0[k]) / wall * 100, 1) for k, p in extra.items()},
                          "loadgen": round((self_cpu() - c_l0) / wall * 100, 1),
                          "sys": round((s1[0] - s0[0]) / max(1, s1[1] - s0[1]) * 100 * (os.cpu_count() or 1), 1)}
        return res

    return wrapper


def fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def table(headers: list[str], rows: list[list]) -> str:
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    out = ["  ".join(str(h).rjust(w[i]) if i else str(h).ljust(w[i]) for i, h in enumerate(headers)),
           "  ".join("-" * x for x in w)]
    for r in rows:
        out.append("  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r)))
    return "\n".join(out)


def render(results: dict) -> str:
    out = []
    cfg = results["config"]
    out.append(f"# gateway_path.py  {results['date']}  cores={os.cpu_count()}  "
               f"window={cfg['duration']}s (warmup {cfg['warmup']}s), streams {cfg['stream_duration']}s "
               f"(warmup {cfg['stream_warmup']}s); closed loop; latency in ms; "
               f"cpu% 100 = one core; sys = whole machine ({(os.cpu_count() or 1) * 100} = all cores), "
               "anything above tgt+other+lg is someone else's")
    rows = []
    for t in results["targets"]:
        for r in t["runs"]:
            if r["kind"] != "nonstream":
                continue
            e = r["errors"]
            cpu = r["cpu_pct"]
            extra = " ".join(f"{k}={v:.0f}" for k, v in cpu.items() if k not in ("target", "loadgen", "sys"))
            rows.append([t["label"], r["conc"], fmt(r["rps"], 0), fmt(r["p50_ms"]), fmt(r["p90_ms"]), fmt(r["p99_ms"]),
                         f"{e['non2xx']}/{e['conn'] + e['timeout'] + e['bad_body']}",
                         f"{cpu['target']:.0f}", extra or "-", f"{cpu['loadgen']:.0f}", f"{cpu['sys']:.0f}"])
    if rows:
        out.append(f"\n## Non-streaming (max_tokens {cfg['max_tokens']})")
        out.append(table(["target", "c", "req/s", "p50", "p90", "p99", "non2xx/err", "cpu tgt", "cpu other",
                          "cpu lg", "cpu sys"], rows))
    rows = []
    for t in results["targets"]:
        for r in t["runs"]:
            if r["kind"] != "stream":
                continue
            e = r["errors"]
            cpu = r["cpu_pct"]
            extra = " ".join(f"{k}={v:.0f}" for k, v in cpu.items() if k not in ("target", "loadgen", "sys"))
            rows.append([t["label"], r["conc"], fmt(r["streams_per_s"], 1), fmt(r["tokens_per_s"], 0),
                         fmt(r["content_per_stream"], 1), fmt(r["ttft_p50_ms"], 1), fmt(r["ttft_p99_ms"], 1),
                         fmt(r["e2e_p50_ms"], 1), fmt(r["e2e_p99_ms"], 1),
                         f"{e['non2xx']}/{e['conn'] + e['timeout']}/{e['incomplete']}/{e['short']}",
                         f"{cpu['target']:.0f}", extra or "-", f"{cpu['loadgen']:.0f}", f"{cpu['sys']:.0f}"])
    if rows:
        out.append(f"\n## Streaming (max_tokens {cfg['stream_tokens']}; tokens/s = SSE data events/s in the window)")
        out.append(table(["target", "N", "streams/s", "tokens/s", "tok/stream", "ttft p50", "ttft p99", "e2e p50",
                          "e2e p99", "non2xx/err/inc/short", "cpu tgt", "cpu other", "cpu lg", "cpu sys"], rows))
    rows = [[t["label"], t["port"], len(t["mem"]["processes"]), fmt(t["mem"]["rss_mib_sum"], 1),
             fmt(t["mem"]["pss_mib_sum"], 1), fmt(t["mem"]["rss_mib_max"], 1)] for t in results["targets"]
            if t.get("mem")]
    if rows:
        out.append("\n## Memory after the runs (process tree listening on the target's port; MiB)")
        out.append(table(["target", "port", "procs", "RSS sum", "PSS sum", "RSS max/proc"], rows))
    return "\n".join(out)


async def main_async(a: argparse.Namespace) -> dict:
    targets = [Target(s, a.model, a.api_key) for s in a.target]
    extra = {}
    for spec in a.cpu_pid:
        name, _, pid = spec.partition("=")
        extra[name] = int(pid)
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": {
        "conc": a.conc, "duration": a.duration, "warmup": a.warmup, "max_tokens": a.max_tokens,
        "stream_conc": a.stream_conc, "stream_duration": a.stream_duration, "stream_warmup": a.stream_warmup,
        "stream_tokens": a.stream_tokens, "timeout": a.timeout, "cpu_pids": extra}, "targets": []}
    nonstream = measured(run_nonstream)
    stream = measured(run_stream)
    for t in targets:
        err = await preflight(t, a.timeout)
        if err:
            print(f"preflight: {t.label} ({t.base_url}) failed: {err}", file=sys.stderr)
            results["targets"].append({"label": t.label, "base_url": t.base_url, "port": t.port,
                                       "preflight_error": err, "runs": []})
            continue
        entry = {"label": t.label, "base_url": t.base_url, "port": t.port, "runs": []}
        results["targets"].append(entry)
        for c in a.conc:
            r = await nonstream(t, extra, c, a.duration, a.warmup, a.max_tokens, a.timeout)
            entry["runs"].append(r)
            print(f"  {t.label} c={c}: {r['rps']} req/s p50 {r['p50_ms']} p99 {r['p99_ms']} ms "
                  f"errors {r['errors']} cpu {r['cpu_pct']}", flush=True)
            await asyncio.sleep(a.pause)
        for n in a.stream_conc:
            r = await stream(t, extra, n, a.stream_duration, a.stream_warmup, a.stream_tokens, a.timeout)
            entry["runs"].append(r)
            print(f"  {t.label} streams N={n}: {r['tokens_per_s']} tokens/s, {r['streams_per_s']} streams/s, "
                  f"{r['content_per_stream']} tok/stream, ttft p50 {r['ttft_p50_ms']} ms, errors {r['errors']} "
                  f"cpu {r['cpu_pct']}", flush=True)
            await asyncio.sleep(a.pause)
        entry["mem"] = mem_of(pids_for_port(t.port))
        if extra:
            entry["mem_extra"] = {k: mem_of([p]) for k, p in extra.items()}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-t", "--target", action="append", default=[],
                    help="LABEL=BASE_URL[,model=NAME][,key=KEY] (repeat; default conduit=http://127.0.0.1:8000/v1)")
    ap.add_argument("-m", "--model", default="mock", help="model for targets without model= (default: mock)")
    ap.add_argument("-k", "--api-key", default="", help="API key for targets without key=")
    ap.add_argument("-c", "--conc", type=lambda s: [int(x) for x in s.split()], default=[1, 16, 64, 256],
                    help='non-streaming concurrencies (default "1 16 64 256"; "" = none)')
    ap.add_argument("-d", "--duration", type=float, default=15.0, help="measured seconds per non-streaming run")
    ap.add_argument("-w", "--warmup", type=float, default=3.0, help="discarded seconds before each run")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("-s", "--stream-conc", type=lambda s: [int(x) for x in s.split()], default=[100],
                    help='concurrent streams (default "100"; "" = none)')
    ap.add_argument("--stream-duration", type=float, default=20.0)
    ap.add_argument("--stream-warmup", type=float, default=5.0)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    ap.add_argument("--pause", type=float, default=1.0, help="idle seconds between runs")
    ap.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID",
                    help="also account the CPU of this process (e.g. engine=1234, redis=1230); repeat")
    ap.add_argument("--quick", action="store_true", help="-d 5 -w 2 --stream-duration 8 --stream-warmup 2")
    ap.add_argument("-o", "--out", help="write the results as JSON here")
    ap.add_argument("--report", help="also write the rendered table here")
    a = ap.parse_args()
    if not a.target:
        a.target = ["conduit=http://127.0.0.1:8000/v1"]
    if a.quick:
        a.duration, a.warmup, a.stream_duration, a.stream_warmup = 5.0, 2.0, 8.0, 2.0
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    results = asyncio.run(main_async(a))
    text = render(results)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text + "\n")
    if any(t.get("preflight_error") for t in results["targets"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
