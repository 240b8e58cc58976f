"""Prometheus metrics of one shard, served on their own port (`--metrics-port`).

Counters that the shard keeps anyway (pushes, pulls, bytes, refusals, staleness) are read at scrape
time by a collector, so nothing is counted twice; the update latency is a real histogram observed
around each push. Each shard has its own registry, so several shards can live in one process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector


class ShardMetrics:
    """The registry of one shard: its collector and the update-latency histogram."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.update_seconds = Histogram(
            "optserve_update_seconds", "Time from a decoded push to its result (policy and Adam step)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry)
        self._http = None

    def watch(self, core) -> None:
        self.registry.register(_ShardCollector(core))

    def serve(self, port: int, host: str) -> int:
        """Serve /metrics on host:port (0: any free port); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _ShardCollector(Collector):
    def __init__(self, core):
        self.core = core

    def collect(self):
        s = self.core
        store, c = s.store, s.counters
        with store.locked():
            pushes, pulls, dropped = store.pushes, store.pulls, store.dropped
            keys, elements = len(store), store.elements
            st = store.staleness
            hist, total, count = list(st.histogram), st.total, st.count
        yield CounterMetricFamily("optserve_pushes", "Pushes applied", value=pushes)
        yield CounterMetricFamily("optserve_pulls", "Pull snapshots served", value=pulls)
        yield CounterMetricFamily("optserve_dropped_gradients", "Gradients a policy discarded", value=dropped)
        yield CounterMetricFamily("optserve_duplicate_pushes", "Retried pushes acknowledged without applying",
                                  value=c.duplicates)
        yield CounterMetricFamily("optserve_received_bytes", "Request bytes received", value=c.bytes_in)
        yield CounterMetricFamily("optserve_sent_bytes", "Reply payload bytes sent", value=c.bytes_out)
        yield CounterMetricFamily("optserve_data_channel_calls", "Push / Pull / PushPull calls served over "
                                  "the data channel (the rest came over gRPC)", value=c.data_calls)
        rejected = CounterMetricFamily("optserve_rejected_requests", "Requests refused, by gRPC code",
                                       labels=["code"])
        for code, n in sorted(c.rejected_by_code().items()):
            rejected.add_metric([code], n)
        yield rejected
        yield GaugeMetricFamily("optserve_keys", "Keys held", value=keys)
        yield GaugeMetricFamily("optserve_parameters", "Parameter elements held", value=elements)
        path, age = s.checkpointer.last() if s.checkpointer else ("", 0.0)
        yield GaugeMetricFamily("optserve_checkpoint_age_seconds",
                                "Seconds since the newest checkpoint was taken (-1: none)",
                                value=age if path else -1.0)
        buckets, running = [], 0
        for i, n in enumerate(hist[:-1]):
            running += n
            buckets.append((str(i), running))
        buckets.append(("+Inf", count))
        yield HistogramMetricFamily("optserve_staleness",
                                    "Staleness (versions) of applied pushes: the largest over each push's "
                                    "keys",
                                    buckets=buckets, sum_value=total)
