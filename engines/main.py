"""Engine process entrypoint: one backend, one worker, telemetry, signal handling."""

from __future__ import annotations

import asyncio
import logging
import signal

from engines.backend import Backend
from engines.gpu import nvml_reader
from engines.worker import Worker, WorkerSettings
from telemetry.engine_instruments import EngineMetrics
from telemetry.setup import Telemetry

log = logging.getLogger("conduit.engine")


async def serve(backend: Backend, settings: WorkerSettings, *, metrics_port: int | None = None,
                metrics_host: str = "127.0.0.1", otlp_endpoint: str = "") -> None:
    """Serve jobs until SIGTERM/SIGINT, then drain (finish in-flight jobs) and exit."""
    worker = Worker(backend, settings)
    telemetry = Telemetry("conduit-engine", worker.engine_id, otlp_endpoint=otlp_endpoint)
    worker.metrics = metrics = EngineMetrics(telemetry.meter)
    worker.tracing = telemetry.tracing
    metrics.serving(backend.models)
    metrics.watch_jobs(worker.in_flight, backend.max_concurrency)
    metrics.watch_backend(backend)
    gpus = nvml_reader()
    if gpus is not None:
        metrics.watch_gpus(gpus)
    if hasattr(backend, "metrics"):  # backends that record their own (vLLM's engine stats, denoising steps)
        backend.metrics = metrics
    if metrics_port:
        telemetry.serve(metrics_port, metrics_host, ready=worker.ready)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        telemetry.shutdown()
    log.info("engine %s stopped", worker.engine_id)
