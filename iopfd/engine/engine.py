"""All the fault queues one daemon serves, each named, each with its own policy and limits."""

from __future__ import annotations

import asyncio

from iopfd.engine.events import EventQueueServer
from iopfd.engine.queue import QueueServer
from iopfd.engine.stats import OUTCOMES


class Engine:
    def __init__(self) -> None:
        self.queues: dict[str, QueueServer] = {}
        # vEVENTQs, each served beside the fault queue of the same name and stopped with it.
        self.event_queues: dict[str, EventQueueServer] = {}
        self.running = False

    def add(self, server: QueueServer) -> None:
        """Serve one more queue; at once if the engine is running (a queue attached at run time)."""
        if server.name in self.queues:
            raise ValueError(f"a queue named {server.name!r} is already served")
        self.queues[server.name] = server
        if self.running:
            server.start()

    def add_events(self, server: EventQueueServer) -> None:
        """Serve a vEVENTQ beside the fault queue of the same name."""
        if server.name not in self.queues:
            raise ValueError(f"no fault queue named {server.name!r} to serve a vEVENTQ beside")
        if server.name in self.event_queues:
            raise ValueError(f"queue {server.name!r} already has a vEVENTQ")
        self.event_queues[server.name] = server
        if self.running:
            server.start()

    async def remove(self, name: str, grace: float) -> QueueServer:
        """Stop serving a queue and its vEVENTQ, answering everything it read; the caller closes
        their sources."""
        server = self.queues[name]
        events = self.event_queues.get(name)
        await asyncio.gather(server.stop(grace), *([events.stop(grace)] if events else []))
        del self.queues[name]
        self.event_queues.pop(name, None)
        return server

    def start(self) -> None:
        self.running = True
        for server in (*self.queues.values(), *self.event_queues.values()):
            server.start()

    @property
    def reading(self) -> bool:
        """Every queue is being read (what READY=1 promises)."""
        return bool(self.queues) and all(server.reading for server in (*self.queues.values(),
                                                                        *self.event_queues.values()))

    async def stop(self, grace: float) -> None:
        """Stop every queue at once (they share the grace period) and answer all they read."""
        self.running = False
        await asyncio.gather(*(server.stop(grace) for server in (*self.queues.values(), *self.event_queues.values())))

    def totals(self) -> dict[str, int]:
        """Summed counts over all queues, for STATUS= and the demo; every outcome is present, with no
        queue too (the host service starts so)."""
        totals = {"pending": 0, "faults": 0, **dict.fromkeys(OUTCOMES, 0)}
        for server in self.queues.values():
            totals["pending"] += server.pending
            totals["faults"] += server.stats.faults
            for outcome, count in server.stats.outcomes.items():
                totals[outcome] += count
        totals["vevents"] = sum(server.stats.events for server in self.event_queues.values())
        totals["vevents_lost"] = sum(server.stats.lost for server in self.event_queues.values())
        return totals
