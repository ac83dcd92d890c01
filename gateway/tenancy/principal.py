"""Who is asking: an API key's limits and the principal a request runs as.

Data only: the key store (``gateway.tenancy.keys``) makes principals from key records, the
guard attaches one to each request (its ``RequestContext``, ``gateway.context``), and admission, limits,
fair queueing, usage and idempotency read it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

# Bounds the API refuses with a 400 when a key's limits are decoded (``KeyStore`` checks them
# again for keys made in code); they appear in the OpenAPI document. A count is exact as a
# double (Lua's numbers); a priority is jobs per turn in fair queueing.
MAX_COUNT = 2**53
MAX_PRIORITY = 1000
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]


class KeyLimits(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Per-key limits; None: unlimited (or, for ``backlog_share``, the gateway's default)."""

    #: Requests per minute.
    rpm: Count | None = None
    #: Tokens per minute (prompt + completion; reserved at admission, reconciled at the end).
    tpm: Count | None = None
    #: Images per minute.
    ipm: Count | None = None
    #: Requests running or queued at once.
    concurrency: Count | None = None
    #: Weight in fair queueing: a key of priority 2 is served twice as often as one of 1.
    priority: Annotated[int, Meta(ge=1, le=MAX_PRIORITY)] = 1
    #: At most this fraction of a model's backlog may be this key's (None: ``key_backlog_share``).
    backlog_share: Annotated[float, Meta(gt=0, le=1)] | None = None


class Principal(msgspec.Struct, frozen=True):
    """The identity a request runs as: an API key's id, name, model access and limits."""

    #: The key's public id ("" when authentication is off).
    key_id: str
    #: The key's name: safe to log and to put in metric labels (never the key itself).
    name: str
    #: Models the key may use; None: all.
    models: frozenset[str] | None = None
    limits: KeyLimits = msgspec.field(default_factory=KeyLimits)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


#: The principal of every request when authentication is off (``auth = false``).
ANONYMOUS = Principal(key_id="", name="anonymous")
