"""Prometheus metrics, read from the engine's plain counters at scrape time (nothing on the hot path)."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from iopfd.engine import Engine
from iopfd.engine.stats import READ_BATCH_BUCKETS, Histogram


def iopfd_version() -> str:
    try:
        return version("iopfd")
    except PackageNotFoundError:
        return "unknown"


class EngineCollector(Collector):
    """Labels are only the queue name (one per fault queue), the outcome (five values) and the
    vEVENTQ type (one per vEVENTQ, of the few iopfd knows)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        groups = CounterMetricFamily("iopfd_fault_groups", "Fault groups answered, by outcome "
                                     "(success|invalid from the policy, deadline, shed, error)",
                                     labels=["queue", "outcome"])
        faults = CounterMetricFamily("iopfd_faults", "Fault records (page requests) read", labels=["queue"])
        latency = HistogramMetricFamily("iopfd_response_latency_seconds",
                                        "From reading a group to writing its response", labels=["queue"])
        pending = GaugeMetricFamily("iopfd_pending_groups", "Groups read and not yet answered", labels=["queue"])
        write_errors = CounterMetricFamily("iopfd_response_write_errors", "Responses the kernel refused "
                                           "(group already answered by a detach) or that could not be "
                                           "written", labels=["queue"])
        batches = Histogram(READ_BATCH_BUCKETS)  # one histogram for the daemon: summed over queues
        for name, server in list(self.engine.queues.items()):
            stats = server.stats
            for outcome, count in stats.outcomes.items():
                groups.add_metric([name, outcome], count)
            faults.add_metric([name], stats.faults)
            latency.add_metric([name], stats.latency.cumulative(), stats.latency.sum)
            pending.add_metric([name], server.pending)
            write_errors.add_metric([name], stats.write_errors)
            batches.counts = [a + b for a, b in zip(batches.counts, stats.read_batches.counts)]
            batches.sum += stats.read_batches.sum
        read_batch = HistogramMetricFamily("iopfd_read_batch_groups", "Groups returned by one read()",
                                           buckets=batches.cumulative(), sum_value=batches.sum)
        vevents = CounterMetricFamily("iopfd_vevents", "vIOMMU events read from vEVENTQs", labels=["queue", "type"])
        vevents_lost = CounterMetricFamily("iopfd_vevents_lost", "vIOMMU events the kernel dropped because the "
                                           "vEVENTQ was full (from LOST_EVENTS headers and sequence gaps)",
                                           labels=["queue"])
        for name, server in list(self.engine.event_queues.items()):
            vevents.add_metric([name, server.source.type_name], server.stats.events)
            vevents_lost.add_metric([name], server.stats.lost)
        yield from (groups, faults, latency, pending, write_errors, read_batch, vevents, vevents_lost)


def registry_for(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    Info("iopfd_build", "iopfd version and the Python running it", registry=registry).info(
        {"version": iopfd_version(), "python": platform.python_version()})
    return registry


class MetricsServer:
    """The HTTP endpoint (prometheus_client's, on its own thread: scrapes never touch the event loop)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host, self.port = self._server.server_address[:2]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
