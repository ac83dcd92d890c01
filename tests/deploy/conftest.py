"""The deploy suite's session: a Docker daemon, the stand-in bases, each image built once.

Every fixture here is session-scoped: the images are built at most once per run (and buildah's
layer cache and the stand-ins' labels make a second run on the same machine fast), then shared
by every deploy test. Build times and sizes are printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import bases, images
from tests.deploy.daemon import Daemon, DaemonUnavailable

_BUILT: list[images.Built] = []
_NOTES: list[str] = []


def note(line: str) -> None:
    """A line for the run's closing summary (timings a deploy test measured)."""
    _NOTES.append(line)


@pytest.fixture(scope="session")
def deploy_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy-logs")


@pytest.fixture(scope="session")
def docker_daemon(deploy_logs: Path) -> Iterator[Daemon]:
    """A Docker daemon: the running one, or dockerd started here (skips only where none can)."""
    daemon = Daemon(deploy_logs)
    try:
        daemon.ensure()
    except DaemonUnavailable as e:
        pytest.skip(f"deploy tests need a Docker daemon: {e}")
    missing = [c for c in ("docker-compose", "buildah", "mmdebstrap") if not shutil.which(c)]
    if missing:
        pytest.fail(f"a Docker daemon runs but {', '.join(missing)} is missing: bash .ci/install --test")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def stand_ins(docker_daemon: Daemon, deploy_logs: Path) -> dict[str, bool]:
    """The public base images' stand-ins, under their real names (built unless cached)."""
    made = bases.build_all(deploy_logs)
    note("stand-in bases: " + ", ".join(f"{n} {'built' if b else 'cached'}" for n, b in made.items()))
    return made


class ImageBuilder:
    """Builds each image at most once per session, in dockerd under the tag compose uses."""

    def __init__(self, logs: Path, workdir: Path) -> None:
        self.logs = logs
        self.workdir = workdir
        self.done: dict[str, images.Built | None] = {}
        self.torch_url: str | None = None
        self._torch_index: contextlib.ExitStack = contextlib.ExitStack()

    def close(self) -> None:
        self._torch_index.close()

    def __call__(self, image: images.Image) -> images.Built | None:
        if image.tag not in self.done:
            images.hand_base_to_buildah(images.PYTHON_BASE, self.logs / "buildah-bases.log")
            log = self.logs / f"build-{image.name}.log"
            if image.dockerfile == "engine-cpu.Dockerfile":
                if self.torch_url is None:
                    self.torch_url = self._torch_index.enter_context(images.torch_index(self.workdir / "torch-index"))
                built = images.build(image, log, {"TORCH_INDEX_URL": self.torch_url})
            else:
                built = images.build(image, log)
            self.done[image.tag] = built
            if built is None:
                note(f"{image.tag}: in dockerd from the same inputs, not rebuilt")
            else:
                _BUILT.append(built)
        return self.done[image.tag]


@pytest.fixture(scope="session")
def build_image(stand_ins: dict[str, bool], deploy_logs: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageBuilder]:
    builder = ImageBuilder(deploy_logs, tmp_path_factory.mktemp("images"))
    yield builder
    builder.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _BUILT and not _NOTES:
        return
    terminalreporter.section("deploy: images and timings")
    for b in _BUILT:
        terminalreporter.write_line(f"{b.image.tag:<38} build {b.build_s:6.1f} s  to dockerd {b.push_s:5.1f} s  "
                                    f"size {b.size / 1e6:7.0f} MB")
    for line in _NOTES:
        terminalreporter.write_line(line)
