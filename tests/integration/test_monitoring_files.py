"""The shipped Prometheus and Grafana files are well-formed: promtool accepts the scrape config
and the alert rules, the rules pass their own unit tests, every PromQL expression parses, and
the dashboards are what ``compose/grafana/build.py`` builds. (They return data on a live stack:
``tests/e2e/test_monitoring.py``.)"""

from __future__ import annotations

import json
import re
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
    assert files == ["conduit-engines.json", "conduit-keys.json", "conduit-logs.json", "conduit-overview.json",
                     "conduit-queue.json"]
    titles = {}
    for path in DASHBOARDS_DIR.glob("*.json"):
        if path.stem == "conduit-logs":
            continue  # Loki's, not Prometheus's: test_the_logs_dashboard_queries_what_alloy_labels
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


# ---- alerts delivered: Alertmanager's config ------------------------------------------------

ALERTMANAGER_DIR = ROOT / "compose" / "alertmanager"
AMTOOL = shutil.which("amtool")
#: The receivers compose/README.md ("Alerts") shows, each checked by amtool as a user would paste it.
README_RECEIVERS = ROOT / "compose" / "README.md"


def amtool(path: Path) -> subprocess.CompletedProcess[str]:
    if AMTOOL is None:
        pytest.fail("amtool is not installed (Debian's prometheus-alertmanager package; .ci/install)")
    return subprocess.run([AMTOOL, "check-config", str(path)], capture_output=True, text=True, timeout=60)


def rendered(tmp_path: Path, url: str | None) -> subprocess.CompletedProcess[str]:
    """compose/alertmanager/start.sh run as the container runs it, its paths moved under tmp_path and
    Alertmanager replaced by a stand-in that prints its arguments."""
    script = (ALERTMANAGER_DIR / "start.sh").read_text()
    (tmp_path / "etc").mkdir(exist_ok=True)
    shutil.copy(ALERTMANAGER_DIR / "alertmanager.yml", tmp_path / "etc" / "alertmanager.yml")
    script = (script.replace("/etc/alertmanager/", f"{tmp_path}/etc/").replace("/tmp/alertmanager.yml",
                                                                              f"{tmp_path}/out.yml")
              .replace("exec /bin/alertmanager", "exec echo alertmanager"))
    env = {"PATH": "/usr/bin:/bin"} | ({"ALERTMANAGER_WEBHOOK_URL": url} if url is not None else {})
    return subprocess.run(["sh", "-c", script, "start.sh", "--config.file=x"], capture_output=True, text=True,
                          timeout=30, env=env)


def test_amtool_accepts_the_shipped_alertmanager_config() -> None:
    done = amtool(ALERTMANAGER_DIR / "alertmanager.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((ALERTMANAGER_DIR / "alertmanager.yml").read_text())
    # Notifications per alert and model, the label every Conduit alert carries.
    assert "gen_ai_request_model" in config["route"]["group_by"]
    # Every alert Prometheus can fire is routed (the root route takes all; no route drops any).
    assert config["route"]["receiver"] in {r["name"] for r in config["receivers"]}


@pytest.mark.parametrize("url", ["https://hooks.example.com/services/T0/B0/x&y|z", "http://10.0.0.9:5001/alerts"])
def test_start_sh_puts_the_webhook_url_from_env_in_place(tmp_path: Path, url: str) -> None:
    done = rendered(tmp_path, url)
    assert done.returncode == 0 and done.stdout.strip() == "alertmanager --config.file=x", done.stderr
    out = yaml.safe_load((tmp_path / "out.yml").read_text())
    assert out["receivers"][0]["webhook_configs"][0]["url"] == url
    assert (tmp_path / "out.yml").stat().st_mode & 0o077 == 0  # a Slack/PagerDuty URL is a secret
    done = amtool(tmp_path / "out.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://example.com/a'b", "http://a b"])
def test_start_sh_refuses_what_is_not_an_http_url(tmp_path: Path, url: str) -> None:
    done = rendered(tmp_path, url)
    assert done.returncode == 1 and "ALERTMANAGER_WEBHOOK_URL" in done.stderr


def test_start_sh_without_a_url_starts_and_says_alerts_go_nowhere(tmp_path: Path) -> None:
    done = rendered(tmp_path, None)
    assert done.returncode == 0 and "not set" in done.stderr


def test_the_readmes_receivers_pass_amtool(tmp_path: Path) -> None:
    """compose/README.md's Slack, email and PagerDuty receivers, each as a whole config."""
    text = README_RECEIVERS.read_text()
    blocks = re.findall(r"```yaml\n(# alertmanager/alertmanager\.yml.*?)```", text, re.S)
    kinds = set()
    for i, block in enumerate(blocks):
        config = yaml.safe_load(block)
        kinds |= {k for r in config["receivers"] for k in r if k.endswith("_configs")}
        (tmp_path / f"{i}.yml").write_text(block)
        done = amtool(tmp_path / f"{i}.yml")
        assert done.returncode == 0, block + done.stdout + done.stderr
    assert kinds >= {"slack_configs", "email_configs", "pagerduty_configs"}, kinds


# ---- logs and traces: Loki, Alloy, Tempo, Grafana (none runs here) ---------------------------

COMPOSE = ROOT / "compose"
#: Fields Conduit's JSON lines carry (telemetry/logs.py: RequestRecord; engines/running.py's job line).
REQUEST_FIELDS = {"ts", "level", "logger", "request_id", "method", "route", "status", "duration_ms", "service",
                  "instance", "id", "model", "operation", "stream", "key", "error", "ttft_ms", "prompt_tokens",
                  "completion_tokens", "images", "resubmits", "trace_id", "client", "prompt"}


def alloy_config() -> str:
    return (COMPOSE / "alloy" / "config.alloy").read_text()


def alloy_labels() -> tuple[set[str], set[str]]:
    """(stream labels, structured metadata) Alloy gives each line."""
    text = alloy_config()
    labels = set(re.findall(r'target_label\s*=\s*"(\w+)"', text))
    blocks = dict(re.findall(r"(stage\.labels|stage\.structured_metadata)\s*\{\s*values\s*=\s*\{(.*?)\}", text,
                             re.S))
    labels |= set(re.findall(r"(\w+)\s*=", blocks["stage.labels"]))
    return labels, set(re.findall(r"(\w+)\s*=", blocks["stage.structured_metadata"]))


def test_alloys_config_is_wired_and_reads_conduits_fields() -> None:
    """Alloy cannot run here: its syntax balanced, every component it references declared, and the
    JSON fields it extracts ones Conduit writes."""
    text = re.sub(r"//.*", "", alloy_config())
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]") and text.count('"') % 2 == 0
    declared = set(re.findall(r"^([a-z_]+\.[a-z_.]+)\s+\"(\w+)\"\s*\{", text, re.M))
    declared_names = {f"{kind}.{name}" for kind, name in declared}
    assert {k for k, _ in declared} == {"discovery.docker", "discovery.relabel", "loki.source.docker", "loki.process",
                                        "loki.write"}
    for ref in re.findall(r"=\s*\[?((?:discovery|loki)\.[a-z_]+\.\w+)\.(?:targets|rules|receiver)", text):
        assert ref in declared_names, f"{ref} is not declared"
    extracted = dict(re.findall(r'(\w+)\s*=\s*"(\w+)"', re.search(r"stage\.json\s*\{(.*?)\n  \}", text, re.S)[1]))
    assert set(extracted.values()) <= REQUEST_FIELDS
    labels, metadata = alloy_labels()
    assert metadata == {"request_id", "trace_id"} <= set(extracted)
    assert "service" in labels and "level" in labels
    # The socket it reads is the one compose mounts; it pushes where compose says.
    alloy = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]["alloy"]
    assert any(v.endswith(":/var/run/docker.sock:ro") for v in alloy["volumes"])
    assert 'sys.env("LOKI_URL")' in text and "LOKI_URL" in alloy["environment"]


def logql_queries() -> list[tuple[str, str]]:
    board = json.loads((DASHBOARDS_DIR / "conduit-logs.json").read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def test_the_logs_dashboard_queries_what_alloy_labels() -> None:
    """Every stream selector names labels Alloy sets; every filter before a parser is structured
    metadata Alloy sets; every field after `| json` is one Conduit writes."""
    labels, metadata = alloy_labels()
    board = json.loads((DASHBOARDS_DIR / "conduit-logs.json").read_text())
    assert all(p["datasource"] == {"type": "loki", "uid": "loki"} for p in board["panels"] if p["type"] != "row")
    for title, expr in logql_queries():
        selector = re.search(r"\{([^}]*)\}", expr)[1]
        used = set(re.findall(r"(\w+)\s*=~?", selector))
        assert used and used <= labels, f"{title}: {used - labels} is no label of Alloy's"
        pipeline = expr[expr.index("}") + 1:]
        before, _, after = pipeline.partition("| json")
        for field in re.findall(r"\|\s*(\w+)\s*(?:=~|!=|>=|<=|=|>|<)", before):
            assert field in metadata, f"{title}: filters on {field}, which Alloy does not attach"
        for field in re.findall(r"\|\s*(\w+)\s*(?:=~|!=|>=|<=|=|>|<)", after):
            assert field in REQUEST_FIELDS, f"{title}: {field} is no field of Conduit's lines"
    titles = {t for t, _ in logql_queries()}
    assert {"Slow requests", "Lines of request $request_id", "Lines of trace $trace_id"} <= titles
    # The slow-request panel links each request to its lines and its trace.
    slow = next(p for p in board["panels"] if p["title"] == "Slow requests")
    links = {o["matcher"]["options"]: [link["title"] for link in o["properties"][0]["value"]]
             for o in slow["fieldConfig"]["overrides"]}
    assert links == {"request_id": ["Logs of this request"], "trace_id": ["Logs of this trace", "Trace in Tempo"]}
    urls = [link["url"] for o in slow["fieldConfig"]["overrides"] for link in o["properties"][0]["value"]]
    assert "var-request_id=${__data.fields.request_id}" in urls[0]
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"request_id", "trace_id", "slow_ms"} <= names


def test_grafana_links_logs_and_traces_both_ways() -> None:
    datasources = {d["uid"]: d for d in
                   yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/loki.yml").read_text())["datasources"]}
    assert {"loki", "tempo"} <= set(datasources)
    derived = datasources["loki"]["jsonData"]["derivedFields"][0]
    assert derived["datasourceUid"] == "tempo" and derived["url"] == "$${__value.raw}"  # $$: a literal $
    # The regex finds the trace id in the lines Conduit writes (msgspec's JSON: no spaces).
    line = json.dumps({"request_id": "r", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}, separators=(",", ":"))
    assert re.search(derived["matcherRegex"], line)[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    to_logs = datasources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == "loki" and "trace_id=" in to_logs["query"]
    grafana = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]["grafana"]["environment"]
    assert grafana["LOKI_URL"].endswith("http://loki:3100}") and grafana["TEMPO_URL"].endswith("http://tempo:3200}")


def test_loki_and_tempo_listen_where_compose_and_grafana_look() -> None:
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    loki = yaml.safe_load((COMPOSE / "loki" / "loki.yml").read_text())
    assert loki["server"]["http_listen_port"] == 3100
    # Structured metadata (request and trace ids) needs the tsdb store and schema v13.
    assert loki["schema_config"]["configs"][-1]["store"] == "tsdb" and loki["schema_config"]["configs"][-1][
        "schema"] == "v13" and loki["limits_config"]["allow_structured_metadata"] is True
    assert loki["common"]["path_prefix"] == "/loki" and "loki-data:/loki" in services["loki"]["volumes"]
    assert "-config.expand-env=true" in services["loki"]["command"]  # ${LOKI_RETENTION} in loki.yml
    tempo = yaml.safe_load((COMPOSE / "tempo" / "tempo.yml").read_text())
    assert tempo["server"]["http_listen_port"] == 3200
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    assert tempo["storage"]["trace"]["local"]["path"].startswith("/var/tempo")
    assert any(v.endswith(":4318") for v in services["tempo"]["ports"])
