"""``GET /metrics`` of ``fcn-deploy serve``: Prometheus text exposition by the official
``prometheus_client`` library, named by its conventions (``fcn_deploy_serve_`` prefix, base units,
``_total`` counters, ``_seconds`` durations).

The ingress process owns the registry. Request counts and latencies are its own; what happens
in the model replicas (tiles per engine batch, tiles queued, engine seconds, cancelled requests)
each replica pushes to the ingress once a second as cumulative counts, exported per replica by a
custom collector (a restarted replica is a new ``replica`` label: its counters start at zero, as
Prometheus expects of a restarted process). Names (``docs/serving.md``):

=========================================  =========  ==============================================
fcn_deploy_serve_requests_total            counter    segment requests answered, by status, output
fcn_deploy_serve_request_duration_seconds  histogram  segment request latency in the ingress, by output
fcn_deploy_serve_queue_depth               gauge      segment requests accepted and not yet answered
fcn_deploy_serve_retries_total             counter    requests retried once after their replica died
fcn_deploy_serve_image_tiles               histogram  tiles per segmented image
fcn_deploy_serve_batch_tiles               histogram  tiles per engine batch, per replica
fcn_deploy_serve_tiles_queued              gauge      tiles waiting for or in an engine batch, per replica
fcn_deploy_serve_engine_seconds_total      counter    engine (runner) seconds, per replica
fcn_deploy_serve_cancelled_total           counter    requests whose work a replica cancelled, per replica
fcn_deploy_serve_ready                     gauge      1 when a warmed replica answers and not draining
=========================================  =========  ==============================================
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: Latency buckets in seconds (a 1-tile CPU image takes ~0.1 s, a large one tens of seconds).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TILE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: A replica silent this long (dead, or gone with its deployment) leaves the export.
STALE_REPLICA_S = 30.0


class ServeMetrics:
    """The ingress's registry and its metrics; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: this process exports nothing else

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fcn_deploy_serve_requests", "Segment requests answered, by HTTP status and output.",
                                ["status", "output"], registry=r)
        self.latency = Histogram("fcn_deploy_serve_request_duration_seconds",
                                 "Segment request latency in the ingress (body read to answer), by output.",
                                 ["output"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("fcn_deploy_serve_queue_depth",
                                 "Segment requests accepted by the ingress and not yet answered (waiting or running).",
                                 registry=r)
        self.retries = Counter("fcn_deploy_serve_retries", "Segment requests retried once because their replica died.",
                               registry=r)
        self.image_tiles = Histogram("fcn_deploy_serve_image_tiles", "Tiles per segmented image.",
                                     buckets=TILE_BUCKETS, registry=r)
        self.ready = Gauge("fcn_deploy_serve_ready", "1 when a warmed model replica answers and the server is not "
                           "draining, else 0 (as GET /readyz).", registry=r)
        self._replicas: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        r.register(_ReplicaCollector(self))

    def replica_report(self, replica: str, snapshot: dict[str, Any]) -> None:
        """Keep the latest cumulative counts a replica pushed."""
        with self._lock:
            self._replicas[replica] = (time.monotonic(), dict(snapshot))

    def replicas(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            for name in [n for n, (t, _) in self._replicas.items() if now - t > STALE_REPLICA_S]:
                del self._replicas[name]
            return {n: s for n, (_, s) in self._replicas.items()}

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ReplicaCollector:
    """Exports the replicas' pushed counts (:class:`~fcn_deploy.serve.core.ReplicaStats`)."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # names are known only once replicas report; describe nothing (no clash check)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from fcn_deploy.serve.core import ReplicaStats

        batches = HistogramMetricFamily("fcn_deploy_serve_batch_tiles", "Tiles per engine batch (padding of a "
                                        "fixed CUDA batch not counted), per model replica.", labels=["replica"])
        queued = GaugeMetricFamily("fcn_deploy_serve_tiles_queued", "Tiles handed to the batcher and not yet "
                                   "back (waiting for or in an engine batch), per model replica.", labels=["replica"])
        engine = CounterMetricFamily("fcn_deploy_serve_engine_seconds", "Seconds the runner spent on engine "
                                     "batches, per model replica.", labels=["replica"])
        cancelled = CounterMetricFamily("fcn_deploy_serve_cancelled", "Requests whose remaining work a model "
                                        "replica cancelled (client disconnected or timed out), per replica.",
                                        labels=["replica"])
        for name, snap in sorted(self.metrics.replicas().items()):
            running, buckets = 0, []
            for bound, count in zip([str(float(b)) for b in ReplicaStats.BUCKETS] + ["+Inf"], snap["batch_buckets"]):
                running += count
                buckets.append((bound, running))
            batches.add_metric([name], buckets, snap["batch_tiles"])
            queued.add_metric([name], snap["tiles_queued"])
            engine.add_metric([name], snap["engine_seconds"])
            cancelled.add_metric([name], snap["cancelled"])
        yield from (batches, queued, engine, cancelled)
