"""Prometheus metrics, on a registry of the server's own (several servers can share a process).

A model's figures (`ModelMetrics`) are plain counters written by its worker (serve.worker) on each turn;
the server's copy is refreshed from the worker's snapshots. A collector turns them into Prometheus
families when /metrics is read.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = tuple(round(1e-5 * 2 ** i, 8) for i in range(20))  # 10 us .. 5 s
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histo:
    """A histogram with one writer and no lock: counts per bucket (value <= bound; the last is +Inf) and sum."""

    def __init__(self, bounds: tuple):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0
        self.edges = np.asarray(bounds)  # for observe_many

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def observe_many(self, values: np.ndarray) -> None:
        """`observe` each of the values (an array), in a few array operations."""
        found = np.bincount(np.searchsorted(self.edges, values, side="left"), minlength=len(self.counts))
        for i in np.flatnonzero(found).tolist():
            self.counts[i] += int(found[i])
        self.sum += float(values.sum())

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts)):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class Level:
    """A gauge with one writer."""

    value = 0.0

    def set(self, value: float) -> None:
        self.value = value


@dataclass
class ModelMetrics:
    ttfc: Histo = field(default_factory=lambda: Histo(_LATENCY_BUCKETS))
    inter_char: Histo = field(default_factory=lambda: Histo(_LATENCY_BUCKETS))
    batch_size: Histo = field(default_factory=lambda: Histo(_BATCH_BUCKETS))
    active: Level = field(default_factory=Level)
    queued: Level = field(default_factory=Level)

    def snapshot(self) -> tuple:
        return tuple((list(h.counts), h.sum) for h in (self.ttfc, self.inter_char, self.batch_size)) + (
            self.active.value, self.queued.value)

    def load(self, snapshot: tuple) -> None:
        *hists, self.active.value, self.queued.value = snapshot
        for h, (counts, total) in zip((self.ttfc, self.inter_char, self.batch_size), hists):
            h.counts, h.sum = counts, total


_FAMILIES = (  # (kind, name, help, ModelMetrics attribute)
    (HistogramMetricFamily, "charrnn_time_to_first_char_seconds",
     "From a request's arrival to its first generated character", "ttfc"),
    (HistogramMetricFamily, "charrnn_inter_char_seconds", "Between consecutive characters of a stream", "inter_char"),
    (HistogramMetricFamily, "charrnn_batch_size", "Streams in one decode step", "batch_size"),
    (GaugeMetricFamily, "charrnn_active_streams", "Streams in a model's batch", "active"),
    (GaugeMetricFamily, "charrnn_queued_streams", "Streams waiting for room in a batch", "queued"),
)


class _ModelCollector:
    def __init__(self, models: dict[str, ModelMetrics]):
        self.models = models

    def collect(self):
        for kind, name, doc, attr in _FAMILIES:
            family = kind(name, doc, labels=["model"])
            for mid, m in list(self.models.items()):
                value = getattr(m, attr)
                if kind is HistogramMetricFamily:
                    family.add_metric([mid], value.cumulative(), sum_value=value.sum)
                else:
                    family.add_metric([mid], value.value)
            yield family


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.models: dict[str, ModelMetrics] = {}
        r.register(_ModelCollector(self.models))
        self.sessions = Gauge("charrnn_sessions", "Sessions holding state", registry=r)
        self.requests = Counter("charrnn_requests", "Finished requests by method and status code",
                                ["method", "code"], registry=r)
        self.stalled = Counter("charrnn_stalled_streams", "Streams ended because their client took no message "
                                                          "for --stall-timeout-s", registry=r)

    def model(self, model_id: str) -> ModelMetrics:
        return self.models.setdefault(model_id, ModelMetrics())
