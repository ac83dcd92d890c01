#!/usr/bin/env python3
"""targets.py - check a benchmark run against the gateway-path targets.

    python benchmarks/targets.py [--harness OUT/harness/results.jsonl] [--gateway-path OUT/gateway_path.json]

Targets (for each Conduit target: labels starting with "conduit"):
  1. added p50 latency at one client (non-streaming) <= 1 ms over the direct backend ("mock")
  2. req/s at 64 concurrent >= 10x LiteLLM's two-worker req/s ("litellm-2w" when measured in
     the same run, else the reference 135 req/s measured on the 2-core dev machine)
  3. relayed tokens/s (SSE data events/s) at 100 concurrent streams >= 20,000
  4. gateway RSS <= 150 MB (= 143.05 MiB) per process
plus: no non-2xx responses, socket errors, incomplete or short streams in any Conduit run.
Stdlib only; prints a table; exit status 0 (it reports, it does not gate).
"""
from __future__ import annotations

import argparse
import json
import math

LITELLM_2W_REF_RPS = 135.0
RSS_LIMIT_MIB = 150e6 / 2**20


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def load_harness(path: str) -> dict:
    """{label: {"wrk": {c: [rec]}, "stream": {n: [rec]}, "mem": [rec]}}"""
    out: dict = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            k = r.get("kind")
            if k not in ("wrk", "stream", "mem"):
                continue
            d = out.setdefault(r["label"], {"wrk": {}, "stream": {}, "mem": []})
            if k == "mem":
                d["mem"].append(r)
            else:
                d[k].setdefault(r["conc"], []).append(r)
    return out


def harness_view(h: dict) -> dict:
    """Normalise to {label: {"p50": {c: ms}, "rps": {c: x}, "tok": {n: x}, "rss_max": MiB, "rss_sum": MiB, "errors": str}}."""
    v = {}
    for label, d in h.items():
        errs = []
        for c, rs in d["wrk"].items():
            e = sum(r.get("err_status", 0) for r in rs)
            s = sum(r.get("err_connect", 0) + r.get("err_read", 0) + r.get("err_write", 0) + r.get("err_timeout", 0)
                    for r in rs)
            if e or s:
                errs.append(f"wrk c={c}: {e} non-2xx, {s} socket errors")
        for n, rs in d["stream"].items():
            st = sum(r.get("err_status", 0) for r in rs)
            cn = sum(r.get("err_conn", 0) for r in rs)
            inc = sum(r.get("incomplete", 0) for r in rs)
            short = [r.get("content_chunks_per_req") for r in rs if r.get("content_chunks_per_req") not in (None, r.get("max_tokens"))]
            if st or cn or inc or short:
                errs.append(f"streams N={n}: {st} non-200, {cn} conn errors, {inc} incomplete"
                            + (f", tok/req {short}" if short else ""))
        mems = d["mem"]
        v[label] = {
            "p50": {c: mean(r["p50_ms"] for r in rs) for c, rs in d["wrk"].items()},
            "rps": {c: mean(r["rps"] for r in rs) for c, rs in d["wrk"].items()},
            "tok": {n: mean(r["chunks_per_s"] for r in rs) for n, rs in d["stream"].items()},
            "ttft": {n: mean(r["ttft_p50_ms"] for r in rs) for n, rs in d["stream"].items()},
            "rss_max": max((p["rss_mib"] for m in mems for p in m.get("processes", [])), default=None),
            "rss_sum": max((m.get("rss_mib_sum", 0) for m in mems), default=None),
            "errors": "; ".join(errs),
        }
    return v


def gp_view(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    v = {}
    for t in res["targets"]:
        errs = []
        p50, rps, tok, ttft = {}, {}, {}, {}
        if t.get("preflight_error"):
            errs.append("preflight: " + t["preflight_error"][:200])
        for r in t["runs"]:
            bad = {k: n for k, n in r["errors"].items() if n}
            if bad:
                errs.append(f"{r['kind']} c={r['conc']}: {bad}")
            if r["kind"] == "nonstream":
                p50[r["conc"]] = r["p50_ms"]
                rps[r["conc"]] = r["rps"]
            else:
                tok[r["conc"]] = r["tokens_per_s"]
                ttft[r["conc"]] = r["ttft_p50_ms"]
        mem = t.get("mem") or {}
        v[t["label"]] = {"p50": p50, "rps": rps, "tok": tok, "ttft": ttft, "rss_max": mem.get("rss_mib_max"),
                         "rss_sum": mem.get("rss_mib_sum"), "errors": "; ".join(errs)}
    return v


def f(x, nd=2):
    return "-" if x is None else f"{x:,.{nd}f}"


def check(source: str, v: dict, peer_fallback: dict | None = None) -> list[list[str]]:
    rows = []
    base = v.get("mock")
    peer = v.get("litellm-2w") or peer_fallback
    for label in [k for k in v if k.startswith("conduit")]:
        t = v[label]
        # 1. added p50 at c=1
        if 1 in t["p50"]:
            if base and 1 in base["p50"] and t["p50"][1] is not None and base["p50"][1] is not None:
                add = t["p50"][1] - base["p50"][1]
                rows.append([label, source, "added p50 @ c=1 (ms)", f(add), "<= 1.00", "PASS" if add <= 1.0 else "FAIL"])
            elif t["p50"][1] is not None:
                rows.append([label, source, "p50 @ c=1 (ms; no baseline)", f(t["p50"][1]), "<= 1.00 added",
                             "PASS" if t["p50"][1] <= 1.0 else "?"])
        # 2. rps at c=64 vs LiteLLM 2 workers
        if t["rps"].get(64) is not None:
            refs = [(LITELLM_2W_REF_RPS, "litellm-2w reference")]
            if peer and peer["rps"].get(64):
                refs.insert(0, (peer["rps"][64], "litellm-2w same run"))
            for ref, what in refs:
                ratio = t["rps"][64] / ref
                rows.append([label, source, f"req/s @ c=64 ÷ {what} ({f(ref, 0)})",
                             f"{f(t['rps'][64], 0)} = {ratio:.1f}x", ">= 10x", "PASS" if ratio >= 10 else "FAIL"])
        # 3. relayed tokens/s at 100 streams
        if t["tok"].get(100) is not None:
            x = t["tok"][100]
            ttft = t["ttft"].get(100)
            rows.append([label, source, f"tokens/s @ 100 streams (ttft p50 {f(ttft, 1)} ms)", f(x, 0), ">= 20,000",
                         "PASS" if x >= 20000 else "FAIL"])
        # 4. RSS
        if t["rss_max"] is not None:
            rows.append([label, source, f"RSS MiB per process (sum {f(t['rss_sum'], 1)})", f(t["rss_max"], 1),
                         f"<= {RSS_LIMIT_MIB:.1f} (150 MB)", "PASS" if t["rss_max"] <= RSS_LIMIT_MIB else "FAIL"])
        rows.append([label, source, "errors (non-2xx, socket, incomplete/short streams)", t["errors"] or "none",
                     "none", "PASS" if not t["errors"] else "FAIL"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harness", help="peer_overhead.sh results.jsonl")
    ap.add_argument("--gateway-path", help="gateway_path.py JSON")
    a = ap.parse_args()
    rows = []
    peer = None
    if a.harness:
        hv = harness_view(load_harness(a.harness))
        peer = hv.get("litellm-2w")  # LiteLLM measured in the same run (by the harness) is the reference for both
        rows += check("harness", hv)
    if a.gateway_path:
        rows += check("gateway_path", gp_view(a.gateway_path), peer)
    if not rows:
        print("no Conduit results to check")
        return
    headers = ["target", "source", "metric", "value", "goal", ""]
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(headers)))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


if __name__ == "__main__":
    main()
