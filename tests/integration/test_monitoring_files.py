"""The shipped Prometheus and Grafana files are well-formed: promtool accepts the scrape config
and the alert rules, the rules pass their own unit tests, every PromQL expression parses, and
the dashboards are what ``compose/grafana/build.py`` builds. (They return data on a live stack:
``tests/e2e/test_monitoring.py``.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest
import yaml

from tests.harness import ROOT
from tests.monitoring import DASHBOARDS_DIR, PROMETHEUS_DIR, alert_rules, dashboard_queries, scrape_config

PROMTOOL = shutil.which("promtool")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.fail("promtool is not installed (it comes with Debian's prometheus package; .ci/install)")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_its_rule_files(tmp_path: Path) -> None:
    # As shipped, but with the rule file where it is in the repository (compose mounts it in /etc/prometheus)
    # and the metrics credential in a file of the test's (compose mounts the operator's as a secret).
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS_DIR / Path(f).name) for f in config["rule_files"]]
    (tmp_path / "metrics-credential").write_text("a-metrics-credential\n")
    for job in config["scrape_configs"]:
        if "authorization" in job:
            assert job["authorization"]["credentials_file"] == "/run/secrets/metrics-credential"
            job["authorization"]["credentials_file"] = str(tmp_path / "metrics-credential")
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(PROMETHEUS_DIR / "targets" / Path(f).name) for f in sd["files"]]
            assert all(list((PROMETHEUS_DIR / "targets").glob(Path(f).name)) for f in sd["files"]), sd
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "9 rules found" in done.stdout
    # The targets files gateways and engines of other machines go in are valid file_sd (empty lists today).
    for name in ("engines.yml", "gateways.yml"):
        assert yaml.safe_load((PROMETHEUS_DIR / "targets" / name).read_text()) == []


def test_alert_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a test that shows it firing"


def test_the_required_alerts_exist() -> None:
    assert {r["alert"] for r in alert_rules()} >= {
        "ConduitHighErrorRate", "ConduitBacklogGrowing", "ConduitNoLiveEngine", "ConduitTimeToFirstTokenOverSLO",
        "ConduitDeadLetters"}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboards_are_what_the_builder_builds() -> None:
    done = subprocess.run([sys.executable, "compose/grafana/build.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_dashboards_cover_overview_queue_engines_and_keys() -> None:
    files = sorted(p.name for p in DASHBOARDS_DIR.glob("*.json"))
    assert files == ["conduit-engines.json", "conduit-keys.json", "conduit-overview.json", "conduit-queue.json"]
    titles = {}
    for path in DASHBOARDS_DIR.glob("*.json"):
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for p in board["panels"]:
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}  # the provisioned one
                assert p["targets"] and all(t["expr"] for t in p["targets"])
        titles[path.stem] = {p["title"] for p in board["panels"]}
    assert {"Requests/s by route", "Errors/s by code", "Time to first token", "Tokens/s by model",
            "Request duration (generation)"} <= titles["conduit-overview"]
    assert {"Backlog by model", "Queue wait (created → started)", "Reclaimed, dead-lettered, resubmitted"} <= \
        titles["conduit-queue"]
    assert {"Jobs in flight by engine", "Batch size (requests per engine step)", "KV-cache usage", "Images/s",
            "Denoising batch size (images per step)"} <= titles["conduit-engines"]
    assert {"Requests/s by key", "Tokens/s by key", "Rate-limited/s by key and limit", "401s and 429s/s"} <= \
        titles["conduit-keys"]
    provisioning = yaml.safe_load((ROOT / "compose/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioning["datasources"][0]["uid"] == "prometheus"


def test_every_expression_parses() -> None:
    for _, title, expr in dashboard_queries():
        promql_parser.parse(expr)  # raises on a syntax error, naming it
    for rule in alert_rules():
        promql_parser.parse(rule["expr"])


def test_the_scrape_config_points_every_job_at_the_given_ports() -> None:
    config = scrape_config([8000, 8001], [9100], 9090, credential=Path("/tmp/credential"))
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert jobs == {"conduit-gateway": ["127.0.0.1:8000", "127.0.0.1:8001"], "conduit-engine": ["127.0.0.1:9100"],
                    "prometheus": ["127.0.0.1:9090"]}
    # Only the gateways' /metrics takes a credential (the metrics one); it is the given file.
    assert {j["job_name"]: j.get("authorization") for j in config["scrape_configs"]} == {
        "conduit-gateway": {"type": "Bearer", "credentials_file": "/tmp/credential"}, "conduit-engine": None,
        "prometheus": None}
    assert all("authorization" not in j for j in scrape_config([8000], [9100], 9090)["scrape_configs"])
