"""``--models auto``: which of the upstream's ``/v1/models`` ids an upstream engine serves, and how a
re-read changes that (no I/O: ``engines.upstream`` reads the list).

Each model served costs a read loop and a Redis connection (``engines.intake``), and its name goes
into Redis keys (a Redis Cluster hash tag among them), so the list is bounded and the names checked:
an id that is not :data:`MODEL_NAME` is skipped, and past ``models_max`` only the first (sorted) are
served, each with a loud warning. A re-read that fails or lists nothing changes nothing (an upstream
restarting lists no models for a moment); a model is dropped only when two successful non-empty
reads in a row both lack it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("conduit.engine")

#: A model name this engine serves: no whitespace or braces (a ``{`` would change the Redis Cluster
#: hash tag of the model's keys), at most 128 characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")


class ModelList:
    """The models one upstream engine serves under ``--models auto``, from each read of the upstream's."""

    def __init__(self, models_max: int) -> None:
        self.models_max = models_max
        #: The last successful non-empty read (checked and bounded), None before the first.
        self.last: list[str] | None = None
        self._warned: tuple[Any, ...] = ()

    def checked(self, listed: list[Any]) -> list[str]:
        """The ids of a ``/v1/models`` answer this engine may serve: names checked, sorted, bounded."""
        ids = sorted({m for m in listed if isinstance(m, str)})
        bad = [m for m in ids if not MODEL_NAME.fullmatch(m)]
        good = [m for m in ids if MODEL_NAME.fullmatch(m)]
        kept, over = good[:self.models_max], good[self.models_max:]
        warning = (tuple(bad), tuple(over))
        if warning != self._warned:  # once per change, not at every re-read
            self._warned = warning
            if bad:
                log.warning("the upstream lists models whose names this engine cannot serve (not %s): %s; "
                            "skipped", MODEL_NAME.pattern, [m[:140] for m in bad[:10]])
            if over:
                log.error("THE UPSTREAM LISTS %d MODELS, MORE THAN --upstream-models-max (%d): serving the first %d "
                          "(sorted), NOT %s", len(good), self.models_max, self.models_max, over[:10])
        return kept

    def next(self, current: list[str], listed: list[Any]) -> list[str]:
        """The models to serve after a successful read of the upstream's (``listed``: its ids)."""
        read = self.checked(listed)
        if not read:  # an upstream restarting, or a bad answer: keep what is served
            return current
        last, self.last = self.last, read
        keep = [m for m in current if m in read or last is None or m in last]
        added = [m for m in read if m not in keep]
        return sorted(keep + added[:max(self.models_max - len(keep), 0)])
