"""The Litestar application: its routes (``gateway.routes``), lifespan (Redis, reply reader, registry), errors,
and the ASGI stack around it (observer, guard, idempotency)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotFoundException
from litestar.types import ASGIApp

from engines.contract.keys import Keys
from engines.contract.lane import REDIS_ERRORS, open_lane, redacted
from engines.contract.messages import Codec
from engines.contract.store import DirectoryImageStore, open_image_store
from gateway.chat.serving import ChatRenderer
from gateway.completions.serving import CompletionRenderer
from gateway.embeddings.serving import EmbeddingEndpoint
from gateway.responses.records import ResultRecords
from gateway.responses.serving import InputTokensEndpoint, ResponsesEndpoint
from gateway.responses.store import ResponseStore
from gateway.dispatch import Dispatcher
from gateway.errors import ConduitError, error_response
from gateway.flow import RequestFlow
from gateway.images.serving import ImageEdit, ImageGeneration
from gateway.observe import RequestObserver, template_name
from gateway.proxies import TrustedProxies
from gateway.openapi import document_bytes
from gateway.queue import JobQueue, ReplyRouter
from gateway.registry import EngineRegistry
from gateway.routes import route_handlers
from gateway.server import BoundedHttpToolsProtocol
from gateway.services import Services, provide_key_store, provide_services, provide_usage_log
from gateway.settings import GatewaySettings
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.guard import Guard, RouteAccess
from gateway.tenancy.idempotency import IdempotencyMiddleware
from gateway.tenancy.keys import KeyStore
from gateway.tenancy.limits import Limiter
from gateway.tenancy.usage import UsageLog
from telemetry.instruments import GatewayMetrics
from telemetry.logs import RequestLog, configure_logging
from telemetry.setup import Telemetry

log = logging.getLogger("conduit.gateway")


async def _sweep(store: DirectoryImageStore, every_s: float = 60.0) -> None:
    """Delete expired images from a directory store (Redis expires its own)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            removed = await asyncio.to_thread(store.sweep)
            if removed:
                log.info("deleted %d expired images", removed)
        except Exception:
            log.exception("sweeping expired images failed; carrying on")


def gateway_telemetry(settings: GatewaySettings) -> Telemetry:
    """The process's telemetry, as its settings configure it."""
    return Telemetry("conduit-gateway", settings.gateway_id, otlp_endpoint=settings.telemetry.otlp_endpoint,
                     sample_ratio=settings.telemetry.trace_sample_ratio)


def create_app(settings: GatewaySettings, telemetry: Telemetry | None = None,
               request_log: RequestLog | None = None) -> Litestar:
    """The gateway application for one process (``settings.gateway_id`` must be unique).

    ``telemetry``: the process's (the observer around the app shares it); made here if not given.
    ``request_log``: the observer's, flushed when the app shuts down.
    """
    if not settings.gateway_id:
        settings = settings.with_gateway_id()
    telemetry = telemetry or gateway_telemetry(settings)
    gw_metrics = GatewayMetrics(telemetry.meter)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        queueing, tenancy = settings.queue, settings.tenancy
        keys = Keys(settings.redis.key_prefix)
        codec = Codec()
        redis = settings.redis.connect(max_connections=1024)
        registry = EngineRegistry(redis, keys, codec, refresh_s=queueing.registry_refresh_s,
                                  configured=queueing.models, metrics=gw_metrics)
        gw_metrics.watch_queue(registry.backlog_counts)
        gw_metrics.watch_engines(registry.engine_counts)
        router = ReplyRouter(redis, keys.replies(settings.gateway_id), codec, gw_metrics)
        queue = JobQueue(redis, keys, codec, max_backlog=queueing.max_backlog,
                         max_backlog_bytes=queueing.max_backlog_bytes)
        queue.lane.start()
        limiter = Limiter(redis, open_lane(redis, "tenancy"), keys, gw_metrics)
        limiter.lane.start()
        usage_log = UsageLog(redis, keys, ttl_days=tenancy.usage_ttl_days, metrics=gw_metrics)
        dispatcher = Dispatcher(queueing, registry, queue, router, gw_metrics, limiter=limiter, usage=usage_log,
                                tracing=telemetry.tracing)
        store = open_image_store(settings.images.image_store, redis, keys)
        key_store = KeyStore(redis, keys)
        auth = Authenticator(key_store, admin_hash=tenancy.admin_key_hash, metrics_hash=tenancy.metrics_key_hash,
                             poll_s=tenancy.keys_poll_s, threads=tenancy.auth_threads, failures=tenancy.auth_failures,
                             block_s=tenancy.auth_block_s)
        bounds = settings.bounds
        responses = ResponseStore(redis, keys, settings.responses, usage_log)
        records = ResultRecords(redis, keys, queue, responses, usage_log, queueing.request_timeout_s,
                                settings.responses)
        app.state.services = Services(metrics=settings.telemetry.metrics, registry=registry, dispatcher=dispatcher,
                                      flow=RequestFlow(dispatcher, bounds, settings.telemetry),
                                      chat=ChatRenderer.endpoint(bounds), completion=CompletionRenderer.endpoint(bounds),
                                      images=ImageGeneration(store, bounds, settings.images), image_store=store,
                                      image_edits=(edits := ImageEdit(store, bounds, settings.images)),
                                      image_variations=ImageEdit(store, bounds, settings.images, variations=True,
                                                                 held=edits.held),
                                      response_store=responses, result_records=records,
                                      responses=ResponsesEndpoint(bounds, responses, records, registry),
                                      embeddings=EmbeddingEndpoint(bounds, registry),
                                      input_tokens=InputTokensEndpoint(bounds, records),
                                      telemetry=telemetry, redis=redis, key_store=key_store, auth=auth,
                                      usage_log=usage_log, openapi=document_bytes)
        try:
            await router.create_stream()
        except REDIS_ERRORS:
            pass  # the router re-creates it as soon as Redis answers
        tasks = [asyncio.create_task(router.run(), name="reply-router"),
                 asyncio.create_task(registry.run(), name="engine-registry"),
                 asyncio.create_task(dispatcher.watch_jobs(), name="job-check"),
                 asyncio.create_task(dispatcher.cold.watch(), name="cold-starts"),
                 asyncio.create_task(auth.run(), name="keys-version"),
                 asyncio.create_task(usage_log.run(), name="usage-flush")]
        if isinstance(store, DirectoryImageStore):
            tasks.append(asyncio.create_task(_sweep(store), name="image-sweep"))
        try:
            await asyncio.wait_for(registry.refreshed.wait(), timeout=5)
        except TimeoutError:
            log.warning("Redis at %s not reachable yet; serving 503s until it is", redacted(settings.redis.redis_url))
        log.info("gateway %s ready on %s:%d", settings.gateway_id, settings.server.host, settings.server.port)
        BoundedHttpToolsProtocol.on_shutdown = dispatcher.cold.drain  # this worker's server, shutting down
        try:
            yield
        finally:
            BoundedHttpToolsProtocol.on_shutdown = None
            router.closed = registry.closed = dispatcher.closed = dispatcher.cold.closed = usage_log.closed = True
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5)
            try:  # jobs of cold requests whose clients left, not yet taken back (one try, bounded)
                await asyncio.wait_for(dispatcher.cold.last_look(), timeout=3)
            except (TimeoutError, *REDIS_ERRORS):
                log.warning("the last cold-start withdrawals could not be made")
            try:
                await usage_log.flush()  # the last second's counts
            except REDIS_ERRORS:
                log.warning("the last usage counts could not be written")
            await queue.lane.close()
            auth.close()
            await limiter.lane.close()
            try:
                await router.close_stream()
            except REDIS_ERRORS:
                pass
            await redis.aclose()
            telemetry.shutdown()
            if request_log is not None:
                request_log.flush()  # the last lines (they are written every 0.1 s)

    app = Litestar(
        # Admin routes do not exist without an admin credential to guard them.
        route_handlers=route_handlers(admin=bool(settings.tenancy.admin_key_hash)),
        dependencies={"services": Provide(provide_services, sync_to_thread=False),
                      "key_store": Provide(provide_key_store, sync_to_thread=False),
                      "usage_log": Provide(provide_usage_log, sync_to_thread=False)},
        exception_handlers={Exception: error_response},
        lifespan=[lifespan],
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
    )
    app.state.metrics = gw_metrics
    return app


def _route_of(app: Litestar) -> Any:
    """A path's route template, for requests answered before routing (the guard's 401s)."""

    def route_of(path: str, method: str) -> str:
        try:
            template = app.asgi_router.handle_routing(path=path, method=method)[4]  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - no such route (a 404 of its own)
            return "other"
        return template_name(str(template))

    return route_of


def route_access(app: Litestar) -> RouteAccess:
    """What the route a path and method reach needs (its handler's ``opt["access"]``; the guard
    reads none as "key"), asked of the app's own router so that the guard and the router can
    never disagree on the route. None: no route has the path. A path whose route lacks the
    method needs a key (the router then answers 405). The router caches its answers, so
    routing the request again after the guard costs a dict lookup."""
    handle_routing = app.asgi_router.handle_routing

    def access(path: str, method: str) -> str | None:
        try:
            handler = handle_routing(path=path, method=method)[1]  # type: ignore[arg-type]
        except NotFoundException:
            return None
        except HTTPException:  # the method is not the route's: authenticate, then the router's 405
            return "key"
        return handler.opt.get("access", "key")  # type: ignore[no-any-return]

    return access


def build_asgi(settings: GatewaySettings) -> ASGIApp:
    """The ASGI callable a server runs: the observer (request ids, spans, metrics, the request
    log), then the guard (credentials), then idempotency (keyed by the principal the guard
    found), then the app."""
    if not settings.gateway_id:
        settings = settings.with_gateway_id()
    telemetry = gateway_telemetry(settings)
    request_log = (RequestLog(service="conduit-gateway", instance=settings.gateway_id)
                   if settings.telemetry.log_requests else None)
    app = create_app(settings, telemetry, request_log)

    def authenticator() -> Authenticator | None:
        services = getattr(app.state, "services", None)
        return services.auth if services is not None else None

    idempotent = IdempotencyMiddleware(app, settings.idempotency, lambda: app.state.services.redis,
                                       keys=Keys(settings.redis.key_prefix), max_body_bytes=settings.server.max_body_bytes,
                                       request_timeout_s=settings.queue.request_timeout_s,
                                       limiter=lambda: app.state.services.dispatcher.limiter)
    return RequestObserver(Guard(idempotent, settings.tenancy, authenticator, route_access(app)),
                           metrics=app.state.metrics if settings.telemetry.metrics else None, tracing=telemetry.tracing,
                           log=request_log, route_of=_route_of(app),
                           proxies=TrustedProxies.from_settings(settings.server))


def asgi_from_env() -> ASGIApp:
    """Factory for ``uvicorn --factory gateway.app:asgi_from_env`` (one per worker process)."""
    settings = GatewaySettings.from_env(file=os.environ.get("CONDUIT_CONFIG")).with_gateway_id()  # its own id
    BoundedHttpToolsProtocol.max_head_bytes = settings.server.max_header_bytes  # this worker's server protocol
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format, service="conduit-gateway",
                      instance=settings.gateway_id)
    return build_asgi(settings)


__all__ = ["ConduitError", "asgi_from_env", "build_asgi", "create_app"]
