"""vLLM's own engine statistics into Conduit's instruments (``telemetry.engine_instruments.VllmMetrics``).

vLLM's API server exports its scheduler's running and waiting requests, KV-cache usage, time to
first token, inter-token latency, queue time and end-to-end latency. Conduit drives
``AsyncLLM`` without that server, so it reads the same statistics the same way: through a stat
logger that vLLM calls with every engine step's ``SchedulerStats`` and ``IterationStats``
(vLLM's documented extension point for custom loggers). Imports vLLM only when called.
"""

from __future__ import annotations

from typing import Any

from telemetry.engine_instruments import VllmMetrics


def stat_logger_factory(metrics: VllmMetrics) -> Any:
    """A per-engine stat-logger factory for ``AsyncLLM.from_engine_args(stat_loggers=[...])``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class ConduitStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
            self.metrics = metrics

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            record_step(self.metrics, scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index=0: ConduitStatLogger(vllm_config, engine_index)


def record_step(m: VllmMetrics, scheduler: Any, iteration: Any) -> None:
    """One engine step's statistics (either may be None)."""
    if scheduler is not None:
        m.running = scheduler.num_running_reqs
        m.waiting = scheduler.num_waiting_reqs + getattr(scheduler, "num_skipped_waiting_reqs", 0)
        m.kv_cache_usage = scheduler.kv_cache_usage
        if scheduler.num_running_reqs:
            m.batch_size.record(scheduler.num_running_reqs)
    if iteration is None:
        return
    if iteration.num_prompt_tokens:
        m.prompt_tokens.add(iteration.num_prompt_tokens)
    if iteration.num_generation_tokens:
        m.generation_tokens.add(iteration.num_generation_tokens)
    if iteration.num_preempted_reqs:
        m.preemptions.add(iteration.num_preempted_reqs)
    for seconds in iteration.time_to_first_tokens_iter:
        m.time_to_first_token.record(seconds)
    for seconds in iteration.inter_token_latencies_iter:
        m.inter_token_latency.record(seconds)
    for finished in iteration.finished_requests:
        m.e2e.record(finished.e2e_latency)
        m.queue_time.record(finished.queued_time)
