"""Request bodies decoded and validated, every failure a 400 naming the field as OpenAI does."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import msgspec

from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds


class Checked(Protocol):
    """A request type that checks what its schema cannot say (bounds from settings, rules across fields)."""

    def check(self, limits: RequestBounds) -> None: ...


R = TypeVar("R", bound=Checked)


def _param_from_path(message: str) -> tuple[str, str | None]:
    """msgspec says ``Expected `int`, got `str` - at `$.messages[0].role```; OpenAI names the field."""
    head, sep, path = message.rpartition(" - at `")
    if not sep:
        return message, None
    path = path.rstrip("`")
    param = path[2:] if path.startswith("$.") else path.lstrip("$") or None
    return head, param


def _missing_field(message: str) -> str | None:
    # "Object missing required field `model` - at `$.messages[0]`"
    if message.startswith("Object missing required field `"):
        return message.split("`")[1]
    return None


def invalid(exc: msgspec.ValidationError) -> InvalidRequest:
    """A schema violation as OpenAI says it: the field named in ``param``."""
    text, param = _param_from_path(str(exc))
    missing = _missing_field(text)
    if missing is not None:
        param = f"{param}.{missing}" if param else missing
        text = f"Missing required parameter: '{param}'."
    elif param:
        text = f"Invalid value for '{param}': {text}."
    return InvalidRequest(text, param=param, code="invalid_value" if missing is None else "missing_required_parameter")


class RequestDecoder(Generic[R]):
    """Decodes and validates one request type's bodies; every failure is an :class:`InvalidRequest`.

    ``limits`` supplies the bounds on one request's work (``max_choices``, ``max_messages``, ...).
    """

    def __init__(self, request: type[R], limits: RequestBounds | None = None) -> None:
        self._limits = limits if limits is not None else RequestBounds()
        self._decoder = msgspec.json.Decoder(request)

    def decode(self, body: bytes) -> R:
        """The request in ``body``, validated (its ``check``), or an :class:`InvalidRequest`."""
        if not body.strip():
            raise InvalidRequest("The request body is empty; expected a JSON object.")
        try:
            req = self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise invalid(exc) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"We could not parse the JSON body of your request ({exc}). Send a valid JSON "
                                 "object.", code="invalid_json") from None
        req.check(self._limits)
        return req  # type: ignore[no-any-return]
