"""``/v1/models``: OpenAI's model objects."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class Model(Struct):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "conduit"


class ModelList(Struct):
    data: list[Model]
    object: Literal["list"] = "list"
