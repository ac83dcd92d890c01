"""The shipped monitoring files as the tests read them: dashboards' and alert rules' PromQL, the
scrape config pointed at a local stack, and a real Prometheus to run them on."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import yaml

from tests.harness import ROOT, Proc

PROMETHEUS_DIR = ROOT / "compose" / "prometheus"
DASHBOARDS_DIR = ROOT / "compose" / "grafana" / "dashboards"
#: What Grafana puts in place of its variables when the tests run a dashboard's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "15s", "$__range": "1h", "$model": ".*", "$key": ".*"}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL with Grafana's variables filled in) of every Prometheus panel."""
    out = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            if panel.get("datasource", {}).get("type") == "loki":
                continue  # LogQL (the logs dashboard): tests/integration/test_monitoring_files.py
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
                    expr = expr.replace(name, GRAFANA_VARIABLES[name])
                out.append((path.name, panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def selectors(expr: str) -> list[tuple[str, str, list[str]]]:
    """Every vector selector in ``expr``: (metric name, its ``job`` matcher or "", the label names
    its matchers use)."""
    found: list[tuple[str, str, list[str]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            job = next((f'job="{m.value}"' for m in matchers if m.name == "job" and str(m.op) == "MatchOp.Equal"),
                       "")
            found.append((node.name, job, [m.name for m in matchers if m.name != "job"]))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def scrape_config(gateways: list[int], engines: list[int], port: int, interval: str = "1s",
                  credential: Path | None = None) -> dict[str, Any]:
    """The shipped ``prometheus.yml`` with its targets pointed at local ports (job names, rule
    files and everything else as shipped; scrapes and evaluations every ``interval``), and the
    gateways' metrics credential read from ``credential`` (None: gateways whose /metrics is open,
    so none is sent)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(PROMETHEUS_DIR / Path(f).name) for f in config["rule_files"]]
    targets = {"conduit-gateway": gateways, "conduit-engine": engines, "prometheus": [port]}
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"the shipped scrape config's jobs changed: {jobs}"
    for job in config["scrape_configs"]:
        for key in ("dns_sd_configs", "file_sd_configs", "static_configs"):
            job.pop(key, None)
        if "authorization" in job:
            if credential is None:
                del job["authorization"]
            else:
                job["authorization"]["credentials_file"] = str(credential)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in targets[job["job_name"]]]}]
    return config


class Prometheus:
    """A real Prometheus (Debian's package) on a free port with the given config."""

    def __init__(self, config: dict[str, Any], workdir: Path, port: int) -> None:
        exe = shutil.which("prometheus")
        assert exe is not None, "prometheus is not installed (.ci/install installs it with apt)"
        self.port = port
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([exe, f"--config.file={self.config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}"], workdir / "prometheus.log")

    def query(self, expr: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json())

    def wait_until_up(self, targets: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        health: list[str] = []
        while time.monotonic() < deadline:
            try:
                active = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
                health = [t["health"] for t in active]
                if len(health) == targets and all(h == "up" for h in health):
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"targets not all up: {health}\n{self.proc.output()[-2000:]}")

    def stop(self) -> None:
        self.proc.stop()
