"""All the fault queues one daemon serves, each named, each with its own policy and limits."""

from __future__ import annotations

import asyncio

from iopfd.engine.events import EventQueueReader
from iopfd.engine.queue import QueueResponder
from iopfd.engine.stats import OUTCOMES


class Engine:
    def __init__(self) -> None:
        self.queues: dict[str, QueueResponder] = {}
        # vEVENTQs, each read beside the fault queue of the same name and stopped with it.
        self.event_queues: dict[str, EventQueueReader] = {}
        self.running = False

    def add(self, queue: QueueResponder) -> None:
        """Serve one more queue; at once if the engine is running (a queue attached at run time)."""
        if queue.name in self.queues:
            raise ValueError(f"a queue named {queue.name!r} is already served")
        self.queues[queue.name] = queue
        if self.running:
            queue.start()

    def add_events(self, reader: EventQueueReader) -> None:
        """Read a vEVENTQ beside the fault queue of the same name."""
        if reader.name not in self.queues:
            raise ValueError(f"no fault queue named {reader.name!r} to read a vEVENTQ beside")
        if reader.name in self.event_queues:
            raise ValueError(f"queue {reader.name!r} already has a vEVENTQ")
        self.event_queues[reader.name] = reader
        if self.running:
            reader.start()

    async def remove(self, name: str, grace: float) -> QueueResponder:
        """Stop serving a queue and its vEVENTQ, answering everything it read; the caller closes
        their sources."""
        queue = self.queues[name]
        events = self.event_queues.get(name)
        await asyncio.gather(queue.stop(grace), *([events.stop(grace)] if events else []))
        del self.queues[name]
        self.event_queues.pop(name, None)
        return queue

    def _everything(self) -> list[QueueResponder | EventQueueReader]:
        return [*self.queues.values(), *self.event_queues.values()]

    def start(self) -> None:
        self.running = True
        for served in self._everything():
            served.start()

    @property
    def reading(self) -> bool:
        """Every queue is being read (what READY=1 promises)."""
        return bool(self.queues) and all(served.reading for served in self._everything())

    @property
    def healthy(self) -> bool:
        """No queue stopped being served because its fd failed."""
        return all(served.failure is None for served in self._everything())

    async def stop(self, grace: float) -> None:
        """Stop every queue at once (they share the grace period) and answer all they read."""
        self.running = False
        await asyncio.gather(*(served.stop(grace) for served in self._everything()))

    def totals(self) -> dict[str, int]:
        """Summed counts over all queues, for STATUS= and the demo; every outcome is present, with no
        queue too (the host service starts so)."""
        totals = {"pending": 0, "faults": 0, **dict.fromkeys(OUTCOMES, 0)}
        for queue in self.queues.values():
            totals["pending"] += queue.pending
            totals["faults"] += queue.stats.faults
            for outcome, count in queue.stats.outcomes.items():
                totals[outcome] += count
        totals["vevents"] = sum(reader.stats.events for reader in self.event_queues.values())
        totals["vevents_lost"] = sum(reader.stats.lost for reader in self.event_queues.values())
        return totals
