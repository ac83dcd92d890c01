"""Fuzz a live Conduit stack from its own OpenAPI document with schemathesis.

    python -m tests.fuzz --cases 5000 [--seed 0] [--json report.json]

starts a private Redis, a gateway with API keys and the admin API on, a synthetic engine
(chat and completions) and a diffusers engine on the tiny Stable Diffusion pipeline (limits
small enough that any image request the gateway accepts takes milliseconds on a CPU), then
sends ``--cases`` generated requests spread over every operation of ``openapi/openapi.json``:
schema-valid ones and (a third, where the operation takes input) schema-invalid ones.
Every answer is checked: no 5xx at all; the status, content type, headers and body (JSON, and
each event of an event stream) as the document says; invalid input refused with a 4xx.
``tests/integration/test_fuzz.py`` runs the same with a fixed seed and a few hundred cases.

Generated model names are mostly the served ones (else nearly every request would be a 404):
``tiny-llama`` (chat and completions) and ``tiny-sd`` (images); path
parameters mostly name real images and API keys made beforehand; requests to ``/v1`` use an
unlimited key, a key with small limits (429s and ``x-ratelimit-*`` headers) or a wrong one.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.openapi import document_bytes
from gateway.tenancy.keys import HASHER
from tests.harness import ROOT, RedisServer, Stack

CHAT_MODEL = "tiny-llama"
IMAGE_MODEL = "tiny-sd"
ADMIN = "fuzz-admin-credential-0123456789"
WRONG_KEY = "cdt-000000000000-" + "x" * 43

#: Share of the cases each operation gets (scaled to ``--cases``), by operationId.
WEIGHTS: dict[str, float] = {
    "createChatCompletion": 20, "createCompletion": 14, "createResponse": 16, "getInputTokenCounts": 4,
    "createImage": 12, "getImageFile": 5, "listModels": 3, "retrieveModel": 4, "getHealth": 2, "getReadiness": 2,
    "getMetrics": 2, "getOpenApi": 2, "createKey": 8, "listKeys": 2, "retrieveKey": 4, "updateKey": 8, "revokeKey": 5,
    "getKeyUsage": 5, "getResponse": 4, "deleteResponse": 3, "listInputItems": 3, "cancelResponse": 3, "createEmbedding": 10,
    "createImageEdit": 10, "createImageVariation": 4,
}
#: Share of an operation's cases that are schema-invalid (only where it has a body or parameters).
NEGATIVE_SHARE = 1 / 3

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@dataclass
class Target:
    """The live stack a fuzz run talks to, and the names worth drawing."""

    base_url: str
    api_key: str
    limited_key: str
    image_refs: list[str]
    #: Keys the cases may change or revoke ...
    key_ids: list[str]
    #: ... and keys they may only read (the run's own: they must keep working).
    read_only_ids: list[str] = field(default_factory=list)


@dataclass
class OperationResult:
    cases: int = 0
    negative: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: 2xx answers that were event streams.
    streamed: int = 0
    #: Error answers by (status, OpenAI error code).
    codes: Counter[tuple[int, str]] = field(default_factory=Counter)


@dataclass
class Report:
    """Cases, statuses and failures per operation (``METHOD path``)."""

    seed: int
    operations: dict[str, OperationResult] = field(default_factory=lambda: defaultdict(OperationResult))
    #: (operation, what failed) -> how many times, and the first occurrence's details.
    failures: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def cases(self) -> int:
        return sum(r.cases for r in self.operations.values())

    @property
    def server_errors(self) -> int:
        return sum(n for r in self.operations.values() for s, n in r.statuses.items() if s >= 500)

    def fail(self, operation: str, what: str, details: str) -> None:
        count, first = self.failures.get((operation, what), (0, details))
        self.failures[(operation, what)] = (count + 1, first)

    def render(self) -> str:
        failures = sum(n for n, _ in self.failures.values())
        lines = [(f"{self.cases} cases in {self.wall_s:.1f}s (seed {self.seed}); 5xx: {self.server_errors}; "
                  f"failures: {failures} ({len(self.failures)} distinct)"),
                 f"{'operation':<40} {'cases':>6} {'neg':>5} {'sse':>5}  statuses"]
        for name, r in sorted(self.operations.items()):
            statuses = " ".join(f"{s}:{n}" for s, n in sorted(r.statuses.items()))
            lines.append(f"{name:<40} {r.cases:>6} {r.negative:>5} {r.streamed:>5}  {statuses}")
        codes: Counter[tuple[int, str]] = sum((r.codes for r in self.operations.values()), Counter())
        lines.append("error codes: " + ", ".join(f"{s} {c}: {n}" for (s, c), n in sorted(codes.items())))
        for (name, what), (count, first) in sorted(self.failures.items()):
            lines.append(f"\nFAILED {count}x {name}: {what}\n{first[:3000]}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "cases": self.cases, "wall_s": round(self.wall_s, 1),
                "server_errors": self.server_errors,
                "operations": {name: {"cases": r.cases, "negative": r.negative, "streamed": r.streamed,
                                      "statuses": {str(s): n for s, n in sorted(r.statuses.items())},
                                      "codes": {f"{s} {c}": n for (s, c), n in sorted(r.codes.items())}}
                               for name, r in sorted(self.operations.items())},
                "failures": [{"operation": name, "failure": what, "count": count, "first": first}
                             for (name, what), (count, first) in sorted(self.failures.items())]}


# ---- the stack -----------------------------------------------------------------------------

def start(stack: Stack, tiny_sd_dir: Path) -> Target:
    """Start the fuzzed stack on ``stack`` (its Redis) and make what the cases draw from."""
    # A body limit above the longest string the document allows (a 65,536-character grammar, which
    # the generator may write as 6-byte escapes): a too-long string is then the schema's 400, not 413.
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), max_body_bytes=1024 * 1024, request_timeout_s=30)
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def new_key(name: str, **fields: Any) -> dict[str, Any]:
        resp = httpx.post(f"{stack.base_url}/admin/keys", json={"name": name, **fields}, headers=admin, timeout=30)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    main = new_key("fuzz")
    limited = new_key("fuzz-limited", limits={"rpm": 120, "tpm": 20000, "ipm": 60})
    stack.api_key = main["key"]
    key_ids = [new_key(f"spare-{i}", owner="fuzz")["id"] for i in range(8)]
    stack.synthetic(CHAT_MODEL, "--tokens", "8")
    # Engine limits: any image the gateway accepts is at most 64x64 pixels and 4 steps.
    stack.diffusers(IMAGE_MODEL, "--max-size", "64", "--max-steps", "4", "--default-steps", "2",
                    "--max-concurrency", "16", path=tiny_sd_dir, timeout=180)
    refs = []
    for fmt in ("png", "jpeg", "webp"):
        resp = httpx.post(f"{stack.base_url}/v1/images/generations", timeout=60,
                          headers={"Authorization": f"Bearer {stack.api_key}"},
                          json={"model": IMAGE_MODEL, "prompt": "a lighthouse", "size": "64x64", "n": 2,
                                "output_format": fmt, "response_format": "url"})
        assert resp.status_code == 200, resp.text
        refs += [d["url"].rsplit("/", 1)[1] for d in resp.json()["data"]]
    return Target(base_url=stack.base_url, api_key=stack.api_key, limited_key=limited["key"], image_refs=refs,
                  key_ids=key_ids, read_only_ids=[main["id"], limited["id"]])


# ---- the cases -----------------------------------------------------------------------------

def adjust(case: Any, target: Target, rng: random.Random) -> dict[str, str]:
    """Make a generated case name real things most of the time; its ``Authorization`` header.

    Choices come from ``rng`` (seeded per run and operation), not from Hypothesis, whose draws
    lean to their simplest values: "replace 9 times in 10" would happen far less often."""
    op = case.operation
    op_id = op.definition.raw.get("operationId", "")
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and rng.random() < 0.9:
        main, other = (IMAGE_MODEL, CHAT_MODEL) if op_id.startswith("createImage") else (CHAT_MODEL, IMAGE_MODEL)
        case.body["model"] = main if rng.random() < 0.93 else other
        if case.meta is not None and case.meta.generation.mode.is_positive and rng.random() < 0.3:
            case.body["stream"] = True  # rarely generated otherwise: most answers would be JSON
    params = case.path_parameters or {}
    if "model_id" in params and rng.random() < 0.75:
        params["model_id"] = rng.choice([CHAT_MODEL, IMAGE_MODEL])
    if "name" in params and target.image_refs and rng.random() < 0.75:
        params["name"] = rng.choice(target.image_refs)
    if "key_id" in params and rng.random() < 0.75:
        reading = op.method.upper() == "GET" and target.read_only_ids and rng.random() < 0.5
        params["key_id"] = rng.choice(target.read_only_ids if reading else target.key_ids)
    headers = case.headers if case.headers is not None else {}
    key = next((h for h in headers if h.lower() == "idempotency-key"), None)
    if key is not None and case.meta is not None and case.meta.generation.mode.is_positive:
        # Generated keys repeat ("0", "00"...): most would answer 409 (reused with another body).
        choice = rng.random()
        if choice < 0.6:
            del headers[key]
        elif choice < 0.8:
            headers[key] = f"{headers[key][:200]}-{rng.getrandbits(64):016x}"
    if (case.meta is not None and not case.meta.generation.mode.is_positive and op.definition.raw.get("security")
            and not any(h.lower() == "authorization" for h in headers)):
        return {}  # the invalid part of this case is the missing credential: keep it missing
    if op.path.startswith("/admin/"):
        credential = ADMIN if rng.random() < 0.95 else "wrong-admin-credential"
    elif op.path.startswith("/v1/"):
        r = rng.random()
        credential = target.api_key if r < 0.8 else target.limited_key if r < 0.95 else WRONG_KEY
    else:
        return {}
    return {"Authorization": f"Bearer {credential}"}


def _has_input(op: Any) -> bool:
    definition = op.definition.raw
    return "requestBody" in definition or any(p.get("in") != "header" for p in definition.get("parameters", []))


def fuzz(target: Target, cases: int, seed_: int = 0, log: Callable[[str], None] | None = None, *,
         document: dict[str, Any] | None = None, only: set[str] | None = None) -> Report:
    """Send about ``cases`` generated requests to ``target``, spread over every operation by
    :data:`WEIGHTS` (``only``: these operationIds), checked against ``document`` (by default
    the gateway's own)."""
    schema = schemathesis.openapi.from_dict(document or json.loads(document_bytes()))
    report = Report(seed=seed_)
    started = time.perf_counter()
    ops = [result.ok() for result in schema.get_all_operations()]
    missing = {o.definition.raw["operationId"] for o in ops} - WEIGHTS.keys()
    assert not missing, f"operations without a weight in tests/fuzz.py: {missing}"
    ops = [o for o in ops if only is None or o.definition.raw["operationId"] in only]
    total = sum(WEIGHTS[o.definition.raw["operationId"]] for o in ops)
    for i, op in enumerate(ops):
        op_id = op.definition.raw["operationId"]
        label = f"{op.method.upper()} {op.path}"
        n = max(1, math.ceil(cases * WEIGHTS[op_id] / total))
        negative = round(n * NEGATIVE_SHARE) if _has_input(op) else 0
        if negative:
            negative = _run(op, GenerationMode.NEGATIVE, negative, seed_ + i, target, report, label)
        # What negative generation could not make (a string path parameter has no invalid value) is made valid.
        _run(op, GenerationMode.POSITIVE, n - negative, seed_ + i, target, report, label)
        if log is not None:
            r = report.operations[label]
            log(f"{label}: {r.cases} cases, {dict(sorted(r.statuses.items()))} ({time.perf_counter() - started:.0f}s)")
    report.wall_s = time.perf_counter() - started
    return report


def _run(op: Any, mode: GenerationMode, count: int, seed_: int, target: Target, report: Report, label: str) -> int:
    """Send ``count`` cases of ``mode`` (fewer if there are no more to make); how many were sent."""
    strategy = op.as_strategy(generation_mode=mode)
    result = report.operations[label]
    rng = random.Random(f"{seed_}:{label}:{mode}")
    before = result.cases

    @seed(seed_ * 2 + (mode is GenerationMode.NEGATIVE))
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, derandomize=False)
    @given(case=strategy)
    def one(case: Any) -> None:
        headers = adjust(case, target, rng)
        result.cases += 1
        result.negative += mode is GenerationMode.NEGATIVE
        try:
            response = case.call(base_url=target.base_url, headers=headers, timeout=60)
        except Exception as exc:  # noqa: BLE001 - a transport failure is a finding, not a crash of the run
            report.fail(label, f"no answer: {type(exc).__name__}", f"{exc}\n{case.as_curl_command(headers=headers)}")
            return
        result.statuses[response.status_code] += 1
        result.streamed += response.status_code < 300 and "event-stream" in str(response.headers.get("content-type"))
        if response.status_code >= 400:
            result.codes[(response.status_code, _error_code(response.content))] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                report.fail(label, _what(failure, response.status_code), str(group)[:4000])
        except Failure as failure:
            report.fail(label, _what(failure, response.status_code), str(failure)[:4000])

    try:
        one()
    except Unsatisfiable:
        pass  # nothing (more) of this mode to generate
    return result.cases - before


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "(not an error envelope)"


def _what(failure: Failure, status: int) -> str:
    return f"{failure.title} (status {status})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000, help="generated requests in all (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="conduit-fuzz-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work)
        stack = Stack(redis.url, work)
        try:
            sd = work / "tiny-sd"
            subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--only", "sd", "--sd-path",
                            str(sd)], cwd=ROOT, check=True, capture_output=True, timeout=600)
            started = time.perf_counter()
            target = start(stack, sd)
            print(f"stack up in {time.perf_counter() - started:.1f}s", file=sys.stderr)
            report = fuzz(target, args.cases, args.seed, log=lambda line: print(line, file=sys.stderr))
        finally:
            stack.stop()
            redis.stop()
    print(report.render())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 1 if report.failures or report.server_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
