"""What the route handlers need, opened and closed by the app's lifespan, given to them by ``Provide``."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from litestar.datastructures import State

from engines.contract.store import ImageStore
from gateway.dispatch import Dispatcher
from gateway.flow import Endpoint, RequestFlow
from gateway.registry import EngineRegistry
from gateway.responses.records import ResultRecords
from gateway.responses.store import ResponseStore
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.keys import KeyStore
from gateway.tenancy.usage import UsageLog
from telemetry.setup import Telemetry


class Services(msgspec.Struct):
    """What the handlers need, opened and closed by the lifespan."""

    #: Whether metrics are recorded and served (``/metrics``; ``TelemetrySettings.metrics``).
    metrics: bool
    registry: EngineRegistry
    dispatcher: Dispatcher
    #: The request flow every generation endpoint shares, and the endpoints.
    flow: RequestFlow
    chat: Endpoint
    completion: Endpoint
    images: Endpoint
    image_edits: Endpoint
    image_variations: Endpoint
    responses: Endpoint
    input_tokens: Endpoint
    embeddings: Endpoint
    image_store: ImageStore
    #: Each API key's stored responses (``/v1/responses/{response_id}``).
    response_store: ResponseStore
    #: Background responses' result records (``gateway.responses.background``).
    result_records: ResultRecords
    telemetry: Telemetry
    redis: aioredis.Redis
    key_store: KeyStore
    auth: Authenticator
    usage_log: UsageLog
    #: This API's OpenAPI document (``gateway.openapi.document_bytes``, built on first use).
    openapi: Callable[[], bytes]


def provide_services(state: State) -> Services:
    return state.services  # type: ignore[no-any-return]


def provide_key_store(state: State) -> KeyStore:
    return state.services.key_store  # type: ignore[no-any-return]


def provide_usage_log(state: State) -> UsageLog:
    return state.services.usage_log  # type: ignore[no-any-return]
