"""``iopfd run`` with a recorder on every queue: the bench's figures, taken through the engine's observer.

    python -m iopfd_dev.bench.recorder REPORT run [iopfd run's arguments]

runs iopfd's own ``main`` in this process with a ``QueueRecord`` as the ``observer`` of each queue
the engine is given (``QueueResponder.observer``, an ``iopfd.engine.stats.QueueObserver``) and,
after a clean exit (status 0), writes REPORT as JSON (``Recorder.report``). The product has no
option for this and imports nothing of it: the recorder wraps ``Engine.add``, ``start`` and ``stop``
of this process only. The emulated bench (``iopfd_dev.bench.emulated``) uses ``Recorder`` the same
way around its in-process ``Server``.

While serving, a record only copies each read's cookie and address columns and each written run's
responses (no object per group, about 20 bytes a group); the figures are worked out at exit.
"""

from __future__ import annotations

import cProfile
import json
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iopfd.engine import Engine, QueueResponder
from iopfd.engine.batch import np
from iopfd.iommufd.fault import ADDR_OFFSET, COOKIE_OFFSET, RECORD, RESPONSE

# Set to a path, the daemon runs under cProfile from READY=1 to the end of its stop, and the stats
# are written there (``iopfd-dev bench --profile``).
PROFILE_ENV = "IOPFD_DEV_PROFILE"
# Comma-separated names of the queues whose reads are traced (``QueueRecord.answered_at``: the seed and
# steady runs, timed from the raise). Tracing costs the daemon two column copies a read (0.5 ms in the
# TCG lab); the C loop records nothing per group in a burst, and nor does the recorder then.
TRACED_ENV = "IOPFD_DEV_TRACED_QUEUES"
LATE_SLACK = 0.05  # a group answered later than its deadline + this is late
_RECORD_WORDS = RECORD.size // 4
_COOKIE_WORD = COOKIE_OFFSET // 4
_RECORD_QWORDS = RECORD.size // 8
_ADDR_QWORD = ADDR_OFFSET // 8
_RESPONSE_WORDS = RESPONSE.size // 4  # struct iommu_hwpt_page_response: its cookie is the first u32


class QueueRecord:
    """What one queue read and wrote, and when (loop.time(), CLOCK_MONOTONIC)."""

    def __init__(self, queue: QueueResponder, traced: bool) -> None:
        self.queue = queue
        self.traced = traced
        self.first_read: float | None = None
        self.last_write: float | None = None
        self._events = 0  # reads and writes so far: orders them for answered_at()
        self._reads: list[tuple[int, Any, Any]] = []  # (event, cookies (u32), addresses (u64))
        self._runs: list[tuple[int, int, float, float]] = []  # (event, responses, started_at, written at)
        self._written: list[memoryview] = []  # traced: the responses of each run

    def read(self, data: memoryview, now: float) -> None:
        if self.first_read is None:
            self.first_read = now
        self._events += 1
        if not self.traced:
            return
        # numpy's strided copies: a memoryview's took 0.2 ms a column per 2 048 records in the TCG lab,
        # a tenth of a group's time in the accept burst (the daemon's CPU figure includes the recorder).
        self._reads.append((self._events, np().frombuffer(data, "<u4")[_COOKIE_WORD::_RECORD_WORDS].copy(),
                            np().frombuffer(data, "<u8")[_ADDR_QWORD::_RECORD_QWORDS].copy()))

    def written(self, runs: list[tuple[Any, float, tuple[tuple[str, int], ...]]], now: float) -> None:
        self.last_write = now
        self._events += 1
        for responses, started_at, _ in runs:
            view = memoryview(responses).cast("B")
            self._runs.append((self._events, view.nbytes // RESPONSE.size, started_at, now))
            if self.traced:  # not copied: the engine makes a new buffer for each run
                self._written.append(view)

    def latencies(self) -> Any:
        """Every answered group's latency, from its clock start to the write of its answer, sorted."""
        import numpy as n

        counts = n.array([count for _, count, _, _ in self._runs], n.int64)
        each = n.array([at - started for _, _, started, at in self._runs], n.float64)
        return n.sort(n.repeat(each, counts))

    def answered_at(self) -> list[tuple[int, float]]:
        """(faulting address, when its answer was written) of every group answered; a group of
        several records by the address of its last one. A cookie names the group of the latest read
        that carried it before the write (the kernel reissues a cookie only once it is answered)."""
        import numpy as n

        if not self._written or not self._reads:  # untraced, or nothing answered
            return []

        def keys(events: list[int], cookies: list[Any]) -> Any:
            """cookie << 32 | event: sorted, a cookie's reads and writes in the order they happened."""
            order = n.repeat(n.array(events, n.uint64), [len(c) for c in cookies])
            return (n.concatenate(cookies).astype(n.uint64) << n.uint64(32)) | order

        read_keys = keys([e for e, _, _ in self._reads], [c for _, c, _ in self._reads])
        addresses = n.concatenate([a for _, _, a in self._reads])
        order = n.argsort(read_keys, kind="stable")  # a cookie twice in one read: its last record wins
        read_keys, addresses = read_keys[order], addresses[order]
        cookies = [n.frombuffer(responses, n.uint32)[0::_RESPONSE_WORDS] for responses in self._written]
        write_keys = keys([e for e, _, _, _ in self._runs], cookies)
        written = n.repeat(n.array([at for _, _, _, at in self._runs]), [len(c) for c in cookies])
        found = n.searchsorted(read_keys, write_keys, side="right") - 1
        ok = found >= 0
        ok[ok] = (read_keys[found[ok]] >> n.uint64(32)) == (write_keys[ok] >> n.uint64(32))
        return list(zip(addresses[found[ok]].tolist(), written[ok].tolist()))


class Recorder:
    """A ``QueueRecord`` on every queue the engine gets while ``installed()``, the CPU time from the
    engine's start (READY=1) to the end of its stop (the last answer written), and the peak RSS then
    (before the figures are worked out)."""

    def __init__(self) -> None:
        self.queues: dict[str, QueueRecord] = {}
        self._traced = set(filter(None, os.environ.get(TRACED_ENV, "").split(",")))
        self.cpu_seconds = 0.0
        self.maxrss_kb = 0
        self._cpu_at_start = 0.0
        profile_path = os.environ.get(PROFILE_ENV)
        self._profile = (cProfile.Profile(), profile_path) if profile_path else None

    @contextmanager
    def installed(self) -> Iterator[Recorder]:
        add, start, stop = Engine.add, Engine.start, Engine.stop
        recorder = self

        def recording_add(self: Engine, queue: QueueResponder) -> None:
            record = QueueRecord(queue, queue.name in recorder._traced)
            queue.observer = record
            add(self, queue)
            recorder.queues[queue.name] = record

        def recording_start(self: Engine) -> None:
            start(self)
            recorder._cpu_at_start = _cpu_seconds()
            if recorder._profile is not None:
                recorder._profile[0].enable()

        async def recording_stop(self: Engine, grace: float) -> None:
            await stop(self, grace)
            if recorder._profile is not None:
                profile, path = recorder._profile
                profile.disable()
                profile.dump_stats(path)
            recorder.cpu_seconds = _cpu_seconds() - recorder._cpu_at_start
            recorder.maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        Engine.add = recording_add  # type: ignore[method-assign]
        Engine.start = recording_start  # type: ignore[method-assign]
        Engine.stop = recording_stop  # type: ignore[method-assign]
        try:
            yield self
        finally:
            Engine.add = add  # type: ignore[method-assign]
            Engine.start = start  # type: ignore[method-assign]
            Engine.stop = stop  # type: ignore[method-assign]

    def report(self) -> dict:
        """Per queue: outcomes, first read, last write, latency percentiles, groups later than their
        deadline + LATE_SLACK, and ``answered_at`` ([address, time] pairs); over all queues, latency
        and late; the CPU time while serving and the peak RSS."""
        import numpy as n

        queues = {}
        every: list[Any] = []
        late = 0
        for name, record in self.queues.items():
            samples = record.latencies()
            every.append(samples)
            queue_late = int(n.count_nonzero(samples > record.queue.config.response_deadline + LATE_SLACK))
            late += queue_late
            queues[name] = {"outcomes": dict(record.queue.stats.outcomes), "first_read": record.first_read,
                            "last_write": record.last_write, "late": queue_late, "latency": percentiles(samples),
                            "answered_at": record.answered_at()}
        overall = n.sort(n.concatenate(every)) if every else n.array([])
        return {"queues": queues, "cpu_seconds": self.cpu_seconds, "maxrss_kb": self.maxrss_kb,
                "overall": {"late": late, "latency": percentiles(overall)}}


def percentiles(ordered: Any) -> dict:
    """p50, p99, p99.9 and max of sorted samples, and their count."""
    return {f"p{q * 100:g}": float(ordered[int(q * (len(ordered) - 1))]) if len(ordered) else None
            for q in (0.5, 0.99, 0.999, 1.0)} | {"count": len(ordered)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m iopfd_dev.bench.recorder REPORT run [iopfd run's arguments]", file=sys.stderr)
        return 2
    from iopfd.cli import main as iopfd_main

    recorder = Recorder()
    with recorder.installed():
        status = iopfd_main(args[1:])
    if status == 0:
        Path(args[0]).write_text(json.dumps(recorder.report()))
    return status


if __name__ == "__main__":
    sys.exit(main())
