"""One vEVENTQ served beside the fault queues: read() -> records -> lost count -> the policy's ``on_event``.

Events take no response, so there is no deadline and nothing to answer at stop. What can go wrong
is losing events: the kernel drops what does not fit the queue's depth, and the sequence numbers
say how many (``SequenceTracker``). Those are counted and logged here.

A policy that takes events (``on_event`` overridden, e.g. ``forward``) gets them in read order from
one task per queue. While it works through a read, the queue is not read: a slow policy leaves the
events in the kernel's queue, whose overflow is then counted as lost, instead of piling them up in
iopfd's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from iopfd.engine.policy import Policy
from iopfd.engine.stats import EventStats
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.viommu import MalformedVevents, SequenceTracker, VeventQueue, VeventRecord, parse_vevents

log = structlog.get_logger("iopfd.engine")

MAX_READS_PER_WAKEUP = 4  # a flooding queue yields to the others (vEVENTs are few and small)


@dataclass(frozen=True, slots=True)
class Vevent:
    """An event as policies get it. ``lost``: events the kernel dropped just before this one. A
    LOST_EVENTS header comes as an event with ``data`` None, standing for ``lost`` dropped events
    (itself the last of them)."""

    queue: str
    type: str  # the vEVENTQ type's name, e.g. "selftest", "arm-smmuv3"
    sequence: int
    lost: int
    data: bytes | None


class EventQueueReader:
    """Serves one vEVENTQ with the policy of the fault queue it was attached with."""

    def __init__(self, source: VeventQueue, policy: Policy, name: str,
                 labels: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.policy = policy
        self.name = name
        self.stats = EventStats()
        self.sequence = SequenceTracker()
        self.failure: str | None = None
        self._delivers = type(policy).on_event is not Policy.on_event
        self._backlog: deque[Vevent] = deque()
        self._delivery: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop  # the running loop, from start()
        self._reading = False
        self._watched = False  # the fd is registered with the loop (not while the policy has a backlog)
        self._log = log.bind(queue=name, veventq_type=source.type_name, **(labels or {}))

    @property
    def reading(self) -> bool:
        return self._reading

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reading = True
        self._watch()
        self._log.info("serving vEVENTQ", fd=self.source.fileno(), policy=self.policy.name)

    def stop_reading(self) -> None:
        self._reading = False
        self._unwatch()

    async def stop(self, grace: float) -> None:
        """Stop reading; give the policy ``grace`` seconds for the events it has not taken yet."""
        self.stop_reading()
        task = self._delivery
        if task is not None:
            await asyncio.wait({task}, timeout=grace)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._backlog:
            self._log.warning("vEVENTs read but not given to the policy before stop", count=len(self._backlog))
            self._backlog.clear()

    def _watch(self) -> None:
        if not self._watched:
            self._loop.add_reader(self.source.fileno(), self._on_readable)
            self._watched = True

    def _unwatch(self) -> None:
        if self._watched:
            self._loop.remove_reader(self.source.fileno())
            self._watched = False

    def _on_readable(self) -> None:
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                records = parse_vevents(self.source.read_raw(), self.source.payload_size)
            except (IommufdError, MalformedVevents) as exc:
                self._fail(f"cannot read the vEVENTQ fd: {exc}")
                return
            if not records:
                return
            for record in records:
                self._take(record)
            if self._backlog:
                self._unwatch()  # read again once the policy has taken these
                self._delivery = self._loop.create_task(self._deliver())
                return

    def _take(self, record: VeventRecord) -> None:
        lost = self.sequence.lost_before(record)
        if lost:
            self.stats.lost += lost
            self._log.warning("vEVENTs lost: the kernel dropped them, the queue was full", lost=lost,
                              sequence=record.sequence, lost_total=self.stats.lost)
        if not record.lost_events:
            self.stats.events += 1
        if self._delivers:
            self._backlog.append(Vevent(self.name, self.source.type_name, record.sequence, lost,
                                        None if record.lost_events else record.data))

    async def _deliver(self) -> None:
        try:
            while self._backlog:
                event = self._backlog.popleft()
                try:
                    await self.policy.on_event(event)
                except Exception:  # a policy's bug costs that event, never the queue
                    self._log.exception("policy failed on a vEVENT", policy=self.policy.name, sequence=event.sequence)
        finally:
            self._delivery = None
            if self._reading and self.failure is None:
                self._watch()

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.stop_reading()
        self._log.error("vEVENTQ no longer served", reason=reason)
