"""Prometheus metrics, on a registry of the server's own (several servers can share a process)."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = tuple(round(1e-5 * 2 ** i, 8) for i in range(20))  # 10 us .. 5 s
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class ModelMetrics:
    """One model's children of the labelled metrics (resolved once: `labels()` is not free)."""

    ttfc: object
    inter_char: object
    batch_size: object
    active: object
    queued: object


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttfc = Histogram("charrnn_time_to_first_char_seconds",
                              "From a request's arrival to its first generated character", ["model"],
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.inter_char = Histogram("charrnn_inter_char_seconds",
                                    "Between consecutive characters of a stream", ["model"],
                                    registry=r, buckets=_LATENCY_BUCKETS)
        self.batch_size = Histogram("charrnn_batch_size", "Streams in one decode step", ["model"],
                                    registry=r, buckets=_BATCH_BUCKETS)
        self.active = Gauge("charrnn_active_streams", "Streams in a model's batch", ["model"], registry=r)
        self.queued = Gauge("charrnn_queued_streams", "Streams waiting for room in a batch", ["model"], registry=r)
        self.sessions = Gauge("charrnn_sessions", "Sessions holding state", registry=r)
        self.requests = Counter("charrnn_requests", "Finished requests by method and status code",
                                ["method", "code"], registry=r)
        self._http = None

    def model(self, model_id: str) -> ModelMetrics:
        return ModelMetrics(*(m.labels(model_id) for m in
                              (self.ttfc, self.inter_char, self.batch_size, self.active, self.queued)))

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics; returns the bound port (port 0 picks one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
