"""The Kubernetes manifests (compose/kubernetes): valid, and in step with the code they run.

Core objects validate against Kubernetes' own schemas (kubernetes-validate, strict: an unknown
field fails); KEDA's against the CRD schemas vendored in tests/schemas (tests/schemas/keda.SOURCE).
The rest checks what no schema can: that the autoscaler watches the stream the engine reads,
that every command line parses with the real CLI, every setting exists, and every selector
selects what it should.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engines.contract.acl import ROLES, acl_file, password_variable
from engines.contract.keys import ENGINE_GROUP, Keys
from engines.cli import cmd_engine
from gateway.cli import cmd_gateway
from gateway.settings import ENV_PREFIX, GatewaySettings, setting_names
from tests.commandline import parse_conduit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "compose" / "kubernetes"
SCHEMAS = ROOT / "tests" / "schemas"
#: The oldest Kubernetes the manifests are written for (native preStop sleep, PDB
#: unhealthyPodEvictionPolicy) and the newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31", "1.37")
#: Gauges the gateways export for autoscaling (queued + running + waiting; waiting only; requests
#: waiting for a cold model: ``gateway.cold``).
AUTOSCALING_METRICS = {"conduit_queue_backlog", "conduit_queue_waiting", "conduit_gateway_requests_cold"}
#: Engine shutdown after its drain: events flushed (<= 10 s), background tasks (<= 5 s), the backend closed.
ENGINE_EXIT_MARGIN_S = 45
WORKLOADS = ("Deployment", "StatefulSet")


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def examples() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.example.yaml"))


def applied() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k` creates, in the kustomization's namespace."""
    objs = [copy.deepcopy(d) for name in kustomization()["resources"] for d in documents(name)]
    for o in objs:
        if o["kind"] != "Namespace":
            o["metadata"]["namespace"] = kustomization()["namespace"]
    return objs


OBJECTS = applied()
EVERYTHING = OBJECTS + [d for name in examples() for d in documents(name)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for w in OBJECTS:
        if w["kind"] in WORKLOADS:
            for c in w["spec"]["template"]["spec"]["containers"]:
                yield w, c


def config() -> dict[str, str]:
    return dict(named("ConfigMap", "conduit-config")["data"])


def secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
            for d in EVERYTHING if d["kind"] == "Secret"}


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom, then env with $(VAR) expanded."""
    maps = {m["metadata"]["name"]: m["data"] for m in of_kind("ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = f"<secret {var['valueFrom']['secretKeyRef']['key']}>"
    return env


def parse(container: dict[str, Any]) -> Any:
    """The container's command line, parsed by the real CLI with the container's environment
    (engine options such as --redis-url and --key-prefix default to CONDUIT_* variables)."""
    assert container["command"] == ["conduit"], container["command"]
    with mock.patch.dict("os.environ", environment(container), clear=True):
        try:
            return parse_conduit([str(a) for a in container["args"]])
        except SystemExit:
            pytest.fail(f"`conduit {' '.join(map(str, container['args']))}` does not parse (stderr above)")


#: The engine Deployments (by their command line's subcommand).
ENGINES = [w["metadata"]["name"] for w, c in containers() if c.get("command") == ["conduit"]
           and c["args"][0] == "engine"]


def engines() -> list[tuple[dict[str, Any], Any]]:
    return [(named("Deployment", name), parse(named("Deployment", name)["spec"]["template"]["spec"]["containers"][0]))
            for name in ENGINES]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pods_selected(selector: dict[str, str]) -> list[str]:
    return [w["metadata"]["name"] for w in OBJECTS if w["kind"] in WORKLOADS
            and selects(selector, w["spec"]["template"]["metadata"]["labels"])]


# ---- files and schemas -----------------------------------------------------------------------

def test_kustomization_lists_exactly_the_manifests() -> None:
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - set(examples())
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(present), "kustomization.yaml's resources and the manifest files differ"
    assert len(set(listed)) == len(listed)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_kubernetes(version: str) -> None:
    core = [o for o in EVERYTHING if not o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in core} >= {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment",
                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for o in core:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} ({version}): {'.'.join(map(str, e.path))}: {e.message}")


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubectl apply`'s strict field validation does
    (the API server would otherwise prune them silently: a misspelt field is a setting lost)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [strict(s) for s in schema] if isinstance(schema, list) else schema


@pytest.mark.parametrize(("kind", "schema"), [("ScaledObject", "keda-scaledobject.json"),
                                              ("TriggerAuthentication", "keda-triggerauthentication.json")])
def test_keda_objects_validate_against_the_crds(kind: str, schema: str) -> None:
    validator = jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / schema).read_text())))
    objs = of_kind(kind)
    assert objs
    for o in objs:
        assert o["apiVersion"] == "keda.sh/v1alpha1"
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(o)]
        assert not errors, f"{kind}/{o['metadata']['name']}: {errors}"
    assert {o["kind"] for o in OBJECTS if o["apiVersion"].startswith("keda.sh/")} <= \
        {"ScaledObject", "TriggerAuthentication"}, "a KEDA kind no schema here validates"


# ---- autoscaling: the triggers watch what the engines read -----------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_scaled_object_watches_its_engines_model(engine: str) -> None:
    deployment = named("Deployment", engine)
    args = parse(deployment["spec"]["template"]["spec"]["containers"][0])
    model, concurrency = args.served_name, args.max_concurrency
    [so] = [s for s in of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == engine]
    assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    triggers = {t["name"]: t for t in so["spec"]["triggers"]}
    assert {n: t["type"] for n, t in triggers.items()} == \
        {"stream": "redis-streams", "backlog": "prometheus", "cold": "prometheus"}

    stream = triggers["stream"]["metadata"]
    assert stream["stream"] == Keys(args.key_prefix).jobs(model)
    # XLEN (streamLength) = queued + running, since engines XDEL what they ack. KEDA uses it
    # only without a consumerGroup (with one: XPENDING or lag), so none may be named here;
    # any other trigger naming a group must name the engines' own.
    assert "consumerGroup" not in stream and "lagCount" not in stream
    for t in so["spec"]["triggers"]:
        assert t["metadata"].get("consumerGroup", ENGINE_GROUP) == ENGINE_GROUP
    # Under fair queueing the stream holds at most every engine's slots: a target at or above one
    # engine's concurrency could never ask for another engine.
    assert 0 < int(stream["streamLength"]) < concurrency
    redis_url = urlsplit(args.redis_url)
    assert stream["address"] == f"{redis_url.hostname}.{kustomization()['namespace']}.svc.cluster.local:" \
                                f"{redis_url.port}", "KEDA's operator runs in its own namespace: a full name"
    named("Service", redis_url.hostname or "")
    # KEDA logs in as the autoscaler user, which may read that stream's length and nothing more.
    auth = named("TriggerAuthentication", triggers["stream"]["authenticationRef"]["name"])
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == \
        {("password", "conduit-secrets", password_variable("autoscaler"))}
    [username] = auth["spec"]["configMapTargetRef"]
    assert username["parameter"] == "username"
    assert named("ConfigMap", username["name"])["data"][username["key"]] == "autoscaler"
    rules = redis_users()["autoscaler"]
    assert any(fnmatchcase(stream["stream"], r.removeprefix("%R~")) for r in rules if r.startswith("%R~"))
    assert "+xlen" in rules and "+@read" not in rules

    for name, first in (("backlog", "max("), ("cold", "sum(")):
        query = triggers[name]["metadata"]["query"]
        selectors = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", query)
        assert selectors, query
        for metric, labels in selectors:
            assert metric in AUTOSCALING_METRICS, f"{metric} is not a gauge the gateways export"
            assert re.findall(r'(\w+)\s*=\s*"([^"]*)"', labels) == [("gen_ai_request_model", model)]
        # The backlog is read from Redis (every gateway reports the same value); cold requests are
        # each gateway's own.
        assert query.replace(" ", "").startswith(first), query
        assert 0 < float(triggers[name]["metadata"]["threshold"]) <= concurrency
    assert "conduit_gateway_requests_cold" in triggers["cold"]["metadata"]["query"]


@pytest.mark.parametrize("engine", ENGINES)
def test_scaled_object_wakes_its_model_from_zero(engine: str) -> None:
    """Engines go down to 0 replicas. Their model is then cold: the gateways queue its requests for
    ``cold_start_timeout_s`` (a 503 at once would leave no demand to see), and a trigger active on
    any of it starts the first engine."""
    model = parse(named("Deployment", engine)["spec"]["template"]["spec"]["containers"][0]).served_name
    [so] = [s for s in of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == engine]
    assert so["spec"].get("minReplicaCount", 0) == 0
    settings = GatewaySettings.from_env({**config(), "CONDUIT_METRICS_AUTH": "false"})  # (its hash: a Secret's)
    assert model in settings.queue.models, "an undeclared model is unknown (404), never cold"
    assert settings.queue.cold_start_timeout_s > 0, "with no wait, a cold model's requests queue nothing"
    triggers = {t["name"]: t["metadata"] for t in so["spec"]["triggers"]}
    # The first cold job goes straight into the stream (no engine has read it): XLEN 1 > 0.
    assert triggers["stream"]["activationLagCount"] == "0"
    for name in ("backlog", "cold"):
        assert float(triggers[name]["activationThreshold"]) == 0, "one waiting request wakes an engine"
    assert so["spec"]["cooldownPeriod"] >= 300, "a model load costs minutes: not back to 0 after every lull"


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_drain_within_their_grace_period(engine: str) -> None:
    pod = named("Deployment", engine)["spec"]["template"]["spec"]
    args = parse(pod["containers"][0])
    assert args.drain_timeout_s >= float(config()["CONDUIT_REQUEST_TIMEOUT_S"]), \
        "a scale-down would cut jobs that are still within their deadline"
    assert pod["terminationGracePeriodSeconds"] >= args.drain_timeout_s + ENGINE_EXIT_MARGIN_S


# ---- command lines, settings, secrets ---------------------------------------------------------

def test_every_command_line_parses_with_the_real_cli() -> None:
    seen = set()
    for w, c in containers():
        if w["metadata"]["name"] == "redis":
            continue
        args = parse(c)
        seen.add(args.command)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        scrape = int(w["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
        if args.command == "gateway":
            assert args.func is cmd_gateway
            settings = GatewaySettings.from_env(environ=environment(c))
            assert settings.server.host == "0.0.0.0" and ports["http"] == settings.server.port == scrape
            assert settings.server.workers == 1, "one process per pod: the HPA scales pods"
            redis_url = settings.redis.redis_url
        else:
            assert args.func is cmd_engine and args.kind in ("vllm", "diffusers")
            assert args.served_name and args.model and args.max_concurrency
            assert ports["metrics"] == args.metrics_port == scrape
            assert args.image_store == config()["CONDUIT_IMAGE_STORE"]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            redis_url = args.redis_url
            assert (settings.redis.redis_username, settings.redis.redis_password) == \
                ("gateway", "<secret REDIS_GATEWAY_PASSWORD>")
        if args.command == "engine":
            assert (args.redis_username, args.redis_password) == ("engine", "<secret REDIS_ENGINE_PASSWORD>")
            assert args.metrics_host == "0.0.0.0", "Prometheus and the kubelet's probes reach the pod's address"
        # Gateways and engines meet in one Redis, each as its own user; no password in the URL.
        assert redis_url == config()["CONDUIT_REDIS_URL"] == "redis://redis:6379/0"
    assert seen == {"gateway", "engine"}
    assert {a.kind for _, a in engines()} == {"vllm", "diffusers"}


def test_every_conduit_variable_is_a_gateway_setting() -> None:
    fields = {ENV_PREFIX + name.upper() for name in setting_names()}
    names = set(config())
    for _, c in containers():
        names |= {v["name"] for v in c.get("env", [])}
    conduit = {n for n in names if n.startswith(ENV_PREFIX)}
    assert conduit - fields == set(), "not a GatewaySettings field"
    gateway = environment(named("Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0])
    GatewaySettings.from_env(environ=gateway)  # every value converts to its field's type
    served = {a.served_name for _, a in engines()}
    assert served <= set(GatewaySettings.from_env(environ=gateway).queue.models), \
        "a model whose engines are all restarting would answer 404 instead of 503"


def test_secret_and_config_references_resolve() -> None:
    secrets = secret_keys()
    maps = {m["metadata"]["name"]: set(m["data"]) for m in of_kind("ConfigMap")}
    for w, c in containers():
        for var in c.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], var
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in maps[ref["configMapKeyRef"]["name"]], var
    for auth in of_kind("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]
        for ref in auth["spec"].get("configMapTargetRef", []):
            assert ref["key"] in maps[ref["name"]]
    assert not [o for o in OBJECTS if o["kind"] == "Secret"], "secrets are created out of band (README.md)"


def redis_users() -> dict[str, list[str]]:
    """Each user of the redis-users ConfigMap: its rules after ``user NAME``."""
    text = named("ConfigMap", "redis-users")["data"]["users.acl"]
    return {ln.split()[1]: ln.split()[2:] for ln in text.splitlines() if ln.startswith("user ")}


def test_redis_has_a_user_per_role_and_no_password_on_its_command_line() -> None:
    """Redis starts through compose/redis/start.sh (the same file) with the users `conduit
    redis-acl --autoscaler` writes for the key prefix: each password from the Secret in the
    environment, never in ``args`` (``kubectl get pod -o yaml`` and ``ps`` show those)."""
    users = named("ConfigMap", "redis-users")["data"]
    assert users["users.acl"] == acl_file(config()["CONDUIT_KEY_PREFIX"], ROLES), \
        "regenerate: conduit redis-acl --autoscaler (into redis.yaml's redis-users)"
    assert users["start.sh"] == (ROOT / "compose" / "redis" / "start.sh").read_text()
    assert redis_users()["default"][0] == "off"
    [redis] = named("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    argv = " ".join(map(str, [*redis["command"], *redis["args"]]))
    assert redis["command"] == ["/bin/sh", "/etc/conduit/redis/start.sh"] and "$(" not in argv
    assert "PASSWORD" not in argv and "requirepass" not in argv
    env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in redis["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    for role in ROLES:
        assert redis_users()[role][:2] == ["on", f"#{{{password_variable(role)}}}"]
        assert env[password_variable(role)] == {"name": "conduit-secrets", "key": password_variable(role)}
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    [volume] = [v for v in named("StatefulSet", "redis")["spec"]["template"]["spec"]["volumes"]
                if v["name"] == mounts["/etc/conduit/redis"]]
    assert volume["configMap"]["name"] == "redis-users"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "--user admin" in " ".join(redis[probe]["exec"]["command"])  # the default user is off


def test_prometheus_scrapes_gateways_with_the_metrics_credential_only() -> None:
    """/metrics needs the metrics credential (its hash from the Secret: the gateway does not start
    without it), and the scrape config README.md gives Prometheus holds that credential, not the
    admin one."""
    assert config()["CONDUIT_METRICS_AUTH"] == "true"
    [gateway] = named("Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    [ref] = [v["valueFrom"]["secretKeyRef"] for v in gateway["env"] if v["name"] == "CONDUIT_METRICS_KEY_HASH"]
    assert ref["name"] == "conduit-secrets" and not ref.get("optional")
    readme = (K8S / "README.md").read_text()
    snippet = readme.split("### Prometheus", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    [job] = [j for j in yaml.safe_load(snippet)["scrape_configs"] if j["job_name"] == "conduit-gateway"]
    assert job["authorization"]["credentials_file"] and "admin" not in json.dumps(job).lower()


# ---- labels, selectors, security ---------------------------------------------------------------

def test_labels_and_selectors_match() -> None:
    for w in OBJECTS:
        if w["kind"] in WORKLOADS:
            assert selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
            assert pods_selected(w["spec"]["selector"]["matchLabels"]) == [w["metadata"]["name"]], \
                "two workloads' selectors overlap"
    for svc in of_kind("Service"):
        [target] = pods_selected(svc["spec"]["selector"])
        [pod] = [w["spec"]["template"]["spec"] for w in OBJECTS if w["metadata"]["name"] == target
                 and w["kind"] in WORKLOADS]
        ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for pdb in of_kind("PodDisruptionBudget"):
        assert len(pods_selected(pdb["spec"]["selector"]["matchLabels"])) == 1
    for hpa in of_kind("HorizontalPodAutoscaler"):
        target = named(hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] >= 2
    sts = named("StatefulSet", "redis")
    assert named("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    [policy] = of_kind("NetworkPolicy")
    assert pods_selected(policy["spec"]["podSelector"]["matchLabels"]) == ["redis"]
    allowed = [p["podSelector"]["matchLabels"] for p in policy["spec"]["ingress"][0]["from"] if "podSelector" in p]
    clients = {w["metadata"]["name"] for w, c in containers() if c.get("command") == ["conduit"]}
    assert clients <= {name for sel in allowed for name in pods_selected(sel)}, "a Redis client is shut out"


def test_pods_run_unprivileged_with_pinned_images() -> None:
    tags: dict[str, str] = {i["name"]: i["newTag"] for i in kustomization()["images"]}
    for w, c in containers():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
        image, _, tag = c["image"].partition(":")
        assert tag and tag != "latest", c["image"]
        if image.startswith("conduit/"):
            assert tags[image] == tag
    assert set(tags) == {"conduit/gateway", "conduit/vllm-engine", "conduit/diffusers-engine"}
    assert len(set(tags.values())) == 1, "gateways and engines of one release"


def test_gateways_stay_in_the_service_without_engines() -> None:
    """Readiness is /health: /ready is 503 while no engine is live, which would take every gateway
    out of the Service exactly when clients should get Conduit's own 503 model_unavailable."""
    c = named("Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("engine", ["engine-llama-3-1-8b", "engine-sdxl"])
def test_engines_are_ready_only_once_serving(engine: str) -> None:
    """An engine's metrics port answers /health while the process lives and /ready once it serves
    (model loaded, registered in Redis): a rollout waits for the new engine before stopping the old."""
    c = named("Deployment", engine)["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_the_same_objects() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    got = sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace"))
                 for o in yaml.safe_load_all(built.stdout) if o)
    want = sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in OBJECTS)
    assert got == want
