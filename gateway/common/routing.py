"""``@get_and_head``: how every GET route of the gateway is declared."""

from __future__ import annotations

from typing import Any

from litestar import route
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler

#: The methods of a GET route.
GET_AND_HEAD = (HttpMethod.GET, HttpMethod.HEAD)


def get_and_head(path: str, **kwargs: Any) -> HTTPRouteHandler:
    """Litestar's ``@get`` answering HEAD too, as RFC 9110 (9.3.2) asks of every GET resource: the
    same handler runs with the same access (``opt``), and the server sends GET's status and headers,
    its Content-Length included, without the body (uvicorn drops a HEAD answer's body). Litestar
    routes HEAD only to a handler that names it: with ``@get`` a HEAD was the router's 405, after
    the guard had asked for an API key even on a public route (``/health`` answered HEAD 401).
    The OpenAPI document lists the GET operation only (HEAD mirrors it, as Starlette's do)."""
    return route(path, http_method=list(GET_AND_HEAD), **kwargs)
