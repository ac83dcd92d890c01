"""A Docker daemon for the deploy tests: the one that runs, or one started here.

Debian's ``docker.io`` (20.10) is what ``.ci/install --test`` installs. When no daemon answers
and ``dockerd`` is installed and we are root, one is started in the background (overlay2, or
vfs where overlay mounts fail; cgroupfs) and stopped at the end of the session. Where none can
start, ``DaemonUnavailable`` says why and the deploy tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


class DaemonUnavailable(Exception):
    """No Docker daemon runs here and none can be started (the reason is the message)."""


def answers() -> bool:
    """Whether a daemon answers on the default socket."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Daemon:
    """The daemon the session uses; ``stop()`` ends it only if this process started it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None

    def ensure(self, deadline_s: float = 60) -> None:
        if answers():
            return
        missing = [c for c in ("dockerd", "docker", "docker-compose", "buildah") if not shutil.which(c)]
        if missing:
            raise DaemonUnavailable(f"no Docker daemon runs and {', '.join(missing)} is not installed "
                                    "(bash .ci/install --test installs docker.io docker-compose buildah mmdebstrap)")
        if os.geteuid() != 0:
            raise DaemonUnavailable("no Docker daemon runs, and starting dockerd needs root")
        failures = []
        for driver in ("overlay2", "vfs"):
            log = self.logs / f"dockerd-{driver}.log"
            with open(log, "wb") as f:
                self.proc = subprocess.Popen(["dockerd", "--storage-driver", driver,
                                              "--exec-opt", "native.cgroupdriver=cgroupfs"],
                                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            end = time.monotonic() + deadline_s
            while time.monotonic() < end and self.proc.poll() is None:
                if answers():
                    return
                time.sleep(0.5)
            if answers():  # another session's dockerd won the race for the socket
                self.proc = None
                return
            self.stop()
            failures.append(f"{driver}: {log.read_text(errors='replace')[-600:]}")
        raise DaemonUnavailable("dockerd did not start:\n" + "\n".join(failures))

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
