"""Stand-ins for the public base images the Dockerfiles and compose name, built from Debian.

Docker Hub is unreachable from here, so ``python:3.11.14-slim-bookworm``, ``redis:7.4.6`` and
``prom/prometheus:v3.5.0``, ``prom/alertmanager:v0.28.1`` are made under those very names from Debian bookworm's packages
(``mmdebstrap --variant=minbase`` piped into ``docker import``): the Dockerfiles and the compose
file stay as users run them. What differs from the real images (Python 3.11.2, Redis 7.0,
Prometheus 2.42, Alertmanager 0.25) is what a user's registry would give; the stand-ins only have to be what
those images promise: ``python``/``pip`` on PATH, a ``redis`` user and ``/data``, a
``prometheus`` entrypoint running as ``nobody``.

Each image carries this machine's CA bundle and ``PIP_CERT`` (package downloads inside a build
pass a TLS-intercepting proxy) and a label hashing its inputs: an image whose label matches is
reused, so only the first session on a machine builds them (~25 s each).

    python -m tests.deploy.bases      # build (or confirm) every stand-in, print name and size
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LABEL = "org.conduit.standin-inputs"
#: Bump to rebuild every stand-in after changing how they are made.
RECIPE = 1


@dataclass(frozen=True)
class StandIn:
    """One stand-in image: the Debian packages it holds, shell run in its root, image settings."""

    name: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def inputs(self) -> str:
        ca = CA_BUNDLE.read_bytes() if CA_BUNDLE.exists() else b""
        text = json.dumps([RECIPE, self.name, self.packages, self.hooks, self.changes, self.env,
                           hashlib.sha256(ca).hexdigest()])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


#: The syslog collector of the logging test (tests/deploy/test_observability.py).
SYSLOG_IMAGE = "conduit-test/rsyslog:bookworm"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STAND_INS = (
    StandIn("python:3.11.14-slim-bookworm",
            # python3-dev: the official image has Python's headers (torch.compile builds against them).
            ("python3", "python3-dev", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates"),
            # The official image's pip installs anywhere; Debian's refuses outside a venv (PEP 668).
            hooks=("rm -f /usr/lib/python3*/EXTERNALLY-MANAGED",),
            changes=('CMD ["python3"]',),
            env={"LANG": "C.UTF-8"}),
    StandIn("redis:7.4.6", ("redis-server", "ca-certificates"),
            hooks=("install -d -o redis -g redis /data",),
            changes=("WORKDIR /data", 'CMD ["redis-server"]', "EXPOSE 6379")),
    StandIn("prom/prometheus:v3.5.0", ("prometheus", "wget", "ca-certificates"),
            hooks=("install -d -o nobody -g nogroup /prometheus /etc/prometheus",),
            changes=("USER nobody", "WORKDIR /prometheus", 'ENTRYPOINT ["/usr/bin/prometheus"]',
                     'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]',
                     "EXPOSE 9090")),
    # Debian's binary under the official image's names (/bin/alertmanager, /bin/amtool); the
    # official image's busybox gives /bin/sh and sed, which compose/alertmanager/start.sh uses.
    StandIn("prom/alertmanager:v0.28.1", ("prometheus-alertmanager", "wget", "ca-certificates"),
            hooks=("ln -s /usr/bin/prometheus-alertmanager /usr/bin/alertmanager",
                   "install -d -o nobody -g nogroup /alertmanager /etc/alertmanager"),
            changes=("USER nobody", "WORKDIR /alertmanager", 'ENTRYPOINT ["/bin/alertmanager"]',
                     'CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]',
                     "EXPOSE 9093")),
    # Not a public image: the log collector the deploy tests run (Docker's syslog log driver into
    # it), since Loki and Alloy cannot run here. Its configuration comes from the test.
    StandIn(SYSLOG_IMAGE, ("rsyslog", "ca-certificates"),
            changes=('CMD ["rsyslogd", "-n", "-f", "/etc/rsyslog.conf"]', "EXPOSE 514")),
)


def current_label(name: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', name],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else None


def build(image: StandIn, log: Path) -> bool:
    """Build ``image`` unless one with the same inputs exists; True when it was built."""
    inputs = image.inputs()
    if current_label(image.name) == inputs:
        return False
    hooks = [f'cp {CA_BUNDLE} "$1{CA_BUNDLE}"'] if CA_BUNDLE.exists() else []
    hooks += [f'chroot "$1" sh -c {json.dumps(h)}' for h in image.hooks]
    env = {"PATH": _PATH, **image.env}
    if CA_BUNDLE.exists():
        env |= {"PIP_CERT": str(CA_BUNDLE), "SSL_CERT_FILE": str(CA_BUNDLE), "REQUESTS_CA_BUNDLE": str(CA_BUNDLE)}
    changes = [*image.changes, *(f"ENV {k}={v}" for k, v in env.items()), f"LABEL {LABEL}={inputs}"]
    strap = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
             "--aptopt=APT::Install-Recommends \"false\"",
             "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             f"--include={','.join(image.packages)}",
             *(f"--customize-hook={h}" for h in hooks),
             "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
             "bookworm", "-"]
    imp = ["docker", "import", *(a for c in changes for a in ("--change", c)), "-", image.name]
    with open(log, "wb") as f:
        strapper = subprocess.Popen(strap, stdout=subprocess.PIPE, stderr=f)
        assert strapper.stdout is not None
        importer = subprocess.run(imp, stdin=strapper.stdout, stdout=f, stderr=subprocess.STDOUT, timeout=900)
        strapper.stdout.close()
        strapper.wait(timeout=60)
    if strapper.returncode or importer.returncode:
        raise RuntimeError(f"stand-in {image.name} failed (mmdebstrap {strapper.returncode}, docker import "
                           f"{importer.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
    return True


def build_all(logs: Path) -> dict[str, bool]:
    """Every stand-in, built side by side (downloads, mostly); name → whether it was built now."""
    logs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(STAND_INS)) as pool:
        futures = {s.name: pool.submit(build, s, logs / f"standin-{s.name.replace('/', '_')}.log")
                   for s in STAND_INS}
        return {name: f.result() for name, f in futures.items()}


if __name__ == "__main__":
    for name, built in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/conduit-standins")).items():
        print(name, "built" if built else "cached")
