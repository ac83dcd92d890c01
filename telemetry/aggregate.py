"""Conduit's instruments: OpenTelemetry's data model, at a fraction of the SDK's cost per record.

The OpenTelemetry SDK spends 6-7 µs on one ``Histogram.record`` (attribute cleaning and
hashing, a measurement object, exemplar sampling, locks). A gateway request records five or
six values and costs the gateway ~250 µs of CPU in all, so the SDK alone would take 10-15% of
its throughput. Here a caller binds an instrument to its attributes once (:meth:`Histogram.bind`)
and a histogram record is a list append; values are folded into the buckets in C-level loops
at collection time (or every :data:`FOLD_AT` values), and :attr:`Meter.before_collect` lets a
caller batch even further (a gateway keeps one tuple per request: ``GatewayMetrics.request``).

At collection time (a Prometheus scrape) :meth:`Meter.produce` turns the aggregates into the
SDK's own ``MetricsData`` (cumulative sums, gauges and explicit-bucket histograms), which
OpenTelemetry's Prometheus reader translates exactly as it does the SDK's instruments: same
names, units, bucket boundaries and ``target_info``. Instruments hold at most
``max_series`` attribute sets each; further ones are counted in one overflow series
(``otel.metric.overflow="true"``, as the SDK's cardinality limit does), so no input can make
a process's metrics grow without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter as _Counts
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import (
    Histogram as HistogramData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("conduit.telemetry")

Attributes = Mapping[str, str | int | float | bool]
#: Attributes in a canonical, hashable order.
_Key = tuple[tuple[str, str | int | float | bool], ...]

_OVERFLOW: _Key = (("otel.metric.overflow", True),)
_CUMULATIVE = AggregationTemporality.CUMULATIVE


def _key(attributes: Attributes | None) -> _Key:
    return tuple(sorted(attributes.items())) if attributes else ()


class _Instrument:
    kind = ""

    def __init__(self, name: str, unit: str, description: str, max_series: int) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.max_series = max_series
        self._lock = threading.Lock()

    def _series_of(self, attributes: Attributes | None, series: dict[_Key, Any], make: Callable[[], Any]) -> Any:
        """The series of ``attributes`` in ``series``, made by ``make()`` the first time (the
        overflow series once ``max_series`` exist)."""
        key = _key(attributes)
        found = series.get(key)
        if found is None:
            with self._lock:
                if key not in series and len(series) >= self.max_series:
                    key = _OVERFLOW
                found = series.get(key)
                if found is None:
                    found = series[key] = make()
        return found

    def metric(self, start_ns: int, now_ns: int) -> Metric | None:
        raise NotImplementedError


class CounterSeries:
    """A counter bound to one attribute set (see :meth:`Counter.bind`)."""

    __slots__ = ("value", "_lock")

    def __init__(self, lock: threading.Lock) -> None:
        self.value = 0.0
        self._lock = lock

    def add(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount


class Counter(_Instrument):
    """A monotonic sum (Prometheus ``_total``)."""

    kind = "counter"

    def __init__(self, name: str, unit: str, description: str, max_series: int) -> None:
        super().__init__(name, unit, description, max_series)
        self._series: dict[_Key, CounterSeries] = {}

    def bind(self, attributes: Attributes | None = None) -> CounterSeries:
        """The series of ``attributes`` (created at 0: bind known attribute sets at start, so a
        rate over them exists before the first event)."""
        series: CounterSeries = self._series_of(attributes, self._series, lambda: CounterSeries(self._lock))
        return series

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        self.bind(attributes).add(amount)

    def metric(self, start_ns: int, now_ns: int) -> Metric | None:
        with self._lock:
            points = [NumberDataPoint(dict(k), start_ns, now_ns, _number(s.value)) for k, s in self._series.items()]
        if not points:
            return None
        return Metric(self.name, self.description, self.unit, Sum(points, _CUMULATIVE, is_monotonic=True))


#: Values a histogram series keeps before it folds them into its buckets.
FOLD_AT = 2048


class HistogramSeries:
    """A histogram bound to one attribute set (see :meth:`Histogram.bind`).

    A record appends the value (under the instrument's lock: engines record from the denoising
    thread and are scraped from the metrics server's); values are folded into the buckets in
    C-level loops (``map``, ``Counter``, ``sum``, ``min``, ``max``) at collection time or every
    :data:`FOLD_AT` values, so a record costs a few hundred CPU instructions instead of a bisect
    and a dozen attribute updates. (A gateway's requests take a cheaper path still:
    ``GatewayMetrics.request``.)
    """

    __slots__ = ("bounds", "counts", "count", "sum", "min", "max", "pending", "_lock")

    def __init__(self, bounds: Sequence[float], lock: threading.Lock) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.pending: list[float] = []
        self._lock = lock

    def record(self, value: float) -> None:
        with self._lock:
            pending = self.pending
            pending.append(value)
            full = len(pending) >= FOLD_AT
        if full:
            self.fold()

    def fold(self) -> None:
        """Fold the pending values into the buckets (bucket i holds (bounds[i-1], bounds[i]]:
        OpenTelemetry's, and Prometheus's ``le``)."""
        with self._lock:
            values, self.pending = self.pending, []
            if not values:
                return
            counts = self.counts
            for i, n in _Counts(map(bisect_left, repeat(self.bounds), values)).items():
                counts[i] += n
            self.count += len(values)
            self.sum += sum(values)
            self.min = min(self.min, min(values))
            self.max = max(self.max, max(values))


class Histogram(_Instrument):
    """Explicit-bucket histogram (Prometheus ``_bucket``/``_sum``/``_count``)."""

    kind = "histogram"

    def __init__(self, name: str, unit: str, description: str, max_series: int, bounds: Sequence[float]) -> None:
        super().__init__(name, unit, description, max_series)
        self.bounds = tuple(bounds)
        self._series: dict[_Key, HistogramSeries] = {}

    def bind(self, attributes: Attributes | None = None) -> HistogramSeries:
        """The series of ``attributes``; keep it for attributes that repeat (a model's, say)."""
        series: HistogramSeries = self._series_of(attributes, self._series,
                                                  lambda: HistogramSeries(self.bounds, self._lock))
        return series

    def record(self, value: float, attributes: Attributes | None = None) -> None:
        self.bind(attributes).record(value)

    def metric(self, start_ns: int, now_ns: int) -> Metric | None:
        for series in list(self._series.values()):
            series.fold()
        with self._lock:
            points = [HistogramDataPoint(dict(k), start_ns, now_ns, s.count, _number(s.sum), list(s.counts),
                                         list(self.bounds), s.min, s.max)
                      for k, s in self._series.items() if s.count]
        if not points:
            return None
        return Metric(self.name, self.description, self.unit, HistogramData(points, _CUMULATIVE))


#: What a gauge's callback returns: (value, attributes) pairs, read at collection time.
Observations = Iterable[tuple[float, Attributes | None]]


class ObservableGauge(_Instrument):
    """A value read at collection time from a callback (no cost between scrapes)."""

    kind = "gauge"

    def __init__(self, name: str, unit: str, description: str, max_series: int,
                 callback: Callable[[], Observations]) -> None:
        super().__init__(name, unit, description, max_series)
        self.callback = callback

    def metric(self, start_ns: int, now_ns: int) -> Metric | None:
        try:
            observed = list(self.callback())[:self.max_series]
        except Exception:
            # One failing source (an engine mid-shutdown) must not take the whole scrape down.
            log.exception("reading %s failed", self.name)
            return None
        points = [NumberDataPoint(dict(_key(a)), start_ns, now_ns, _number(v)) for v, a in observed]
        if not points:
            return None
        return Metric(self.name, self.description, self.unit, Gauge(points))


class ObservableCounter(ObservableGauge):
    """A monotonic total read at collection time (something else keeps the count)."""

    kind = "counter"

    def metric(self, start_ns: int, now_ns: int) -> Metric | None:
        gauge = super().metric(start_ns, now_ns)
        if gauge is None:
            return None
        return Metric(self.name, self.description, self.unit,
                      Sum(gauge.data.data_points, _CUMULATIVE, is_monotonic=True))  # type: ignore[union-attr]


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class Meter:
    """Creates a process's instruments and produces their state as OpenTelemetry ``MetricsData``.
    """

    def __init__(self, scope: str, resource: Resource | None = None, *, version: str = "0.1.0",
                 max_series: int = 2000) -> None:
        self.scope = InstrumentationScope(scope, version)
        self.resource = resource or Resource.create({})
        self.max_series = max_series
        self.instruments: list[_Instrument] = []
        #: Called before each collection (callers that batch their records fold them here).
        self.before_collect: list[Callable[[], None]] = []
        self._start_ns = time.time_ns()
        self._lock = threading.Lock()

    def _add(self, instrument: _Instrument) -> None:
        with self._lock:
            if any(i.name == instrument.name for i in self.instruments):
                raise ValueError(f"instrument {instrument.name!r} is defined twice")
            self.instruments.append(instrument)

    def counter(self, name: str, *, unit: str, description: str) -> Counter:
        c = Counter(name, unit, description, self.max_series)
        self._add(c)
        return c

    def histogram(self, name: str, *, unit: str, description: str, bounds: Sequence[float]) -> Histogram:
        h = Histogram(name, unit, description, self.max_series, bounds)
        self._add(h)
        return h

    def gauge(self, name: str, *, unit: str, description: str, callback: Callable[[], Observations]
              ) -> ObservableGauge:
        g = ObservableGauge(name, unit, description, self.max_series, callback)
        self._add(g)
        return g

    def observable_counter(self, name: str, *, unit: str, description: str,
                           callback: Callable[[], Observations]) -> ObservableCounter:
        c = ObservableCounter(name, unit, description, self.max_series, callback)
        self._add(c)
        return c

    def produce(self) -> MetricsData:
        """Every instrument's current state (cumulative since the meter was made)."""
        for fold in list(self.before_collect):
            fold()
        now = time.time_ns()
        with self._lock:
            instruments = list(self.instruments)
        metrics = [m for i in instruments if (m := i.metric(self._start_ns, now)) is not None]
        return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(self.scope, metrics, "")], "")])
