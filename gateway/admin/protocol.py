"""The admin API's own bodies (a key's record as answered is ``gateway.tenancy.keys.KeyInfo``)."""

from __future__ import annotations

import msgspec

from gateway.tenancy.keys import Expiry, KeyInfo, Lifetime, ModelName, Name, Owner
from gateway.tenancy.principal import KeyLimits


class NewKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /admin/keys``: the key to make."""

    name: Name
    owner: Owner = ""
    #: None: every model.
    models: list[ModelName] | None = None
    limits: KeyLimits = msgspec.field(default_factory=KeyLimits)
    #: Epoch milliseconds after which the key stops working ...
    expires_ms: Expiry | None = None
    #: ... or a lifetime in days from now.
    expires_in_days: Lifetime | None = None
    disabled: bool = False


class CreatedKey(KeyInfo, kw_only=True):
    """The answer to a creation: the key's text, shown this once, and its record."""

    key: str


class KeyList(msgspec.Struct):
    data: list[KeyInfo]
    object: str = "list"


class DeletedKey(msgspec.Struct):
    id: str
    object: str = "api_key"
    deleted: bool = True
