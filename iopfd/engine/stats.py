"""Per-queue counters kept as plain integers on the hot path; the service exports them at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Protocol

OUTCOMES = ("success", "invalid", "deadline", "shed", "error")
# Response latency, readiness to write(): 10 µs (a policy that answers at once) to 5 s (past any deadline).
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
READ_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Histogram:
    """Bucket counts with Prometheus semantics (a value lands in the first bucket whose bound is >= it)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """``count`` observations of ``value`` (a read batch answered together shares its latency)."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs, as prometheus_client's HistogramMetricFamily takes them."""
        pairs, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            pairs.append((bound, running))
        return pairs


class QueueStats:
    """What one queue did: groups per outcome, faults read, refused or failed responses, latency."""

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.faults = 0
        self.write_errors = 0
        self.latency = Histogram(LATENCY_BUCKETS)  # from the group's clock start (see unread_wait) to write()
        # From the group's clock start (QueueResponder._found_empty) to the read() that took the group.
        self.unread_wait = Histogram(LATENCY_BUCKETS)
        self.read_batches = Histogram(READ_BATCH_BUCKETS)


class QueueObserver(Protocol):
    """Sees one queue's traffic as it happens, for a benchmark or a trace (``QueueResponder.observer``;
    unset, it costs one ``is None`` test per read and per write). Called on the event loop, so it
    must be quick and must not keep ``data``, a buffer the next read reuses. Times are ``loop.time()``
    (CLOCK_MONOTONIC)."""

    def read(self, data: memoryview, now: float) -> None:
        """A read() returned ``data`` (whole ``struct iommu_hwpt_pgfault`` records) at ``now``."""

    def written(self, runs: list[tuple[Any, float, tuple[tuple[str, int], ...]]], now: float) -> None:
        """One write() at ``now`` sent these runs of answers: ``(responses, started_at, outcomes)``,
        ``responses`` any buffer of ``struct iommu_hwpt_page_response`` (u32 cookie, u32 code), their
        groups' clock start, and ``((outcome, count), ...)``. Entries the kernel refused are included
        (it had answered those groups already)."""


class EventStats:
    """What one vEVENTQ did: events read (LOST_EVENTS headers not counted) and events the kernel dropped."""

    def __init__(self) -> None:
        self.events = 0
        self.lost = 0
