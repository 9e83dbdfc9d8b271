"""Prometheus metrics, read from the engine's plain counters at scrape time (nothing on the hot path)."""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from iopfd.engine import Engine
from iopfd.engine.stats import READ_BATCH_BUCKETS, Histogram
from iopfd.policies import ForwardPolicy, IoasMapPolicy, Policy


def iopfd_version() -> str:
    try:
        return version("iopfd")
    except PackageNotFoundError:
        return "unknown"


class EngineCollector(Collector):
    """Labels are only the queue name (one per fault queue), the outcome (five values), the
    vEVENTQ type (one per vEVENTQ, of the few iopfd knows), a control request's op and result
    (the ops and error codes of docs/protocol.md) and a configured policy's name."""

    def __init__(self, engine: Engine, control_requests: Counter[tuple[str, str]] | None = None,
                 policies: Callable[[], Mapping[str, Policy]] | None = None) -> None:
        self.engine = engine
        self.control_requests = control_requests
        self.policies = policies  # the config's policies by name, as they are at scrape time

    def collect(self) -> Iterator[Metric]:
        groups = CounterMetricFamily("iopfd_fault_groups", "Fault groups answered, by outcome "
                                     "(success|invalid from the policy, deadline, shed, error)",
                                     labels=["queue", "outcome"])
        faults = CounterMetricFamily("iopfd_faults", "Fault records (page requests) read", labels=["queue"])
        latency = HistogramMetricFamily("iopfd_response_latency_seconds",
                                        "From the group's clock start (the first readiness since the queue "
                                        "was last empty) to writing its response", labels=["queue"])
        unread = HistogramMetricFamily("iopfd_unread_wait_seconds",
                                       "How long groups waited unread in the kernel: from the first readiness "
                                       "since the queue was last empty to the read() that took them",
                                       labels=["queue"])
        pending = GaugeMetricFamily("iopfd_pending_groups", "Groups read and not yet answered", labels=["queue"])
        write_errors = CounterMetricFamily("iopfd_response_write_errors", "Responses the kernel refused "
                                           "(group already answered by a detach) or that could not be "
                                           "written", labels=["queue"])
        reading = GaugeMetricFamily("iopfd_queue_reading", "1 while the fault queue is read, 0 once it is not "
                                    "(its fd failed, or the daemon is stopping)", labels=["queue"])
        batches = Histogram(READ_BATCH_BUCKETS)  # one histogram for the daemon: summed over queues
        queues = list(self.engine.queues.items())
        for name, queue in queues:
            stats = queue.stats
            for outcome, count in stats.outcomes.items():
                groups.add_metric([name, outcome], count)
            faults.add_metric([name], stats.faults)
            latency.add_metric([name], stats.latency.cumulative(), stats.latency.sum)
            unread.add_metric([name], stats.unread_wait.cumulative(), stats.unread_wait.sum)
            pending.add_metric([name], queue.pending)
            write_errors.add_metric([name], stats.write_errors)
            reading.add_metric([name], 1 if queue.reading else 0)
            batches.counts = [a + b for a, b in zip(batches.counts, stats.read_batches.counts)]
            batches.sum += stats.read_batches.sum
        read_batch = HistogramMetricFamily("iopfd_read_batch_groups", "Groups returned by one read()",
                                           buckets=batches.cumulative(), sum_value=batches.sum)
        vevents = CounterMetricFamily("iopfd_vevents", "vIOMMU events read from vEVENTQs", labels=["queue", "type"])
        vevents_lost = CounterMetricFamily("iopfd_vevents_lost", "vIOMMU events the kernel dropped because the "
                                           "vEVENTQ was full (from LOST_EVENTS headers and sequence gaps)",
                                           labels=["queue"])
        for name, reader in list(self.engine.event_queues.items()):
            vevents.add_metric([name, reader.source.type_name], reader.stats.events)
            vevents_lost.add_metric([name], reader.stats.lost)
        served = GaugeMetricFamily("iopfd_queues", "Fault queues served (from the config, --fault-fd or the "
                                   "control socket)", value=len(queues))
        requests = CounterMetricFamily("iopfd_control_requests", "Control socket requests, by op (unknown: "
                                       "no op iopfd knows, undecodable, or from a peer refused as unauthorized) "
                                       "and result (ok, or the error code of the refusal)", labels=["op", "result"])
        for (op, result), count in list((self.control_requests or {}).items()):
            requests.add_metric([op, result], count)
        configured = self.policies() if self.policies else {}
        yield from self._peers({name: p for name, p in configured.items() if isinstance(p, ForwardPolicy)})
        yield from self._demand_paging({name: p for name, p in configured.items() if isinstance(p, IoasMapPolicy)})
        yield from (groups, faults, latency, unread, pending, write_errors, reading, read_batch, vevents, vevents_lost,
                    served, requests)

    def _peers(self, policies: Mapping[str, ForwardPolicy]) -> Iterator[Metric]:
        """Per forward policy (one per [policies.NAME] table of type forward): its peer channel."""
        queued = GaugeMetricFamily("iopfd_peer_queued_groups", "Groups waiting to be sent to the forward "
                                   "policy's peer (its socket is full); they wait inside their deadline",
                                   labels=["policy"])
        sent = CounterMetricFamily("iopfd_peer_sent_groups", "Groups sent to the forward policy's peer",
                                   labels=["policy"])
        late = CounterMetricFamily("iopfd_peer_late_answers", "Answers from the peer for groups no longer open "
                                   "(answered at the deadline), answered twice or never sent; ignored",
                                   labels=["policy"])
        connected = GaugeMetricFamily("iopfd_peer_connected", "1 while the forward policy has a peer",
                                      labels=["policy"])
        for name, policy in policies.items():
            queued.add_metric([name], policy.queued)
            sent.add_metric([name], policy.stats.sent)
            late.add_metric([name], policy.stats.late_answers)
            connected.add_metric([name], 1 if policy.channel is not None else 0)
        yield from (queued, sent, late, connected)

    def _demand_paging(self, policies: Mapping[str, IoasMapPolicy]) -> Iterator[Metric]:
        """Per ioas-map policy: the pages it mapped, and the groups outside its window."""
        pages = CounterMetricFamily("iopfd_ioas_map_pages", "Faulting pages an ioas-map policy served, by result "
                                    "(mapped into the IOAS, or already_mapped by an earlier fault)",
                                    labels=["policy", "result"])
        outside = CounterMetricFamily("iopfd_ioas_map_outside_window_groups", "Groups an ioas-map policy answered "
                                      "INVALID because they fault outside its window", labels=["policy"])
        for name, policy in policies.items():
            for result in ("mapped", "already_mapped"):
                pages.add_metric([name, result], policy.counts[result])
            outside.add_metric([name], policy.counts["outside_window"])
        yield from (pages, outside)


def registry_for(engine: Engine, control_requests: Counter[tuple[str, str]] | None = None,
                 policies: Callable[[], Mapping[str, Policy]] | None = None) -> CollectorRegistry:
    """The engine's metrics, the control socket's request counts (ControlSocket.requests), the
    figures of the forward and ioas-map policies among ``policies`` and the process_* (open and max fds, CPU,
    memory), python_gc_* and python_info metrics of
    prometheus_client's default registry."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, control_requests, policies))
    for default in (ProcessCollector, PlatformCollector, GCCollector):
        default(registry=registry)
    Info("iopfd_build", "iopfd version and the Python running it", registry=registry).info(
        {"version": iopfd_version(), "python": platform.python_version()})
    return registry


class MetricsEndpoint:
    """The HTTP endpoint (prometheus_client's, on its own thread: scrapes never touch the event loop)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = self._server.server_address[1]  # the port bound (port 0: one the kernel chose)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
