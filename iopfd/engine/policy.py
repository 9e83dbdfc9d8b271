"""What the engine asks of a policy: a response code for each fault group.

A policy is one of four kinds, told apart by its class, never by probing its attributes:

- ``FixedPolicy(code)``: the answer never depends on the group (``accept``, ``reject``). The engine
  answers each read from its cookie column in the loop turn that read it.
- ``BatchPolicy``: ``decide_batch(batch)`` decides a ``Batch`` (the groups of one read, as numpy
  columns) and returns one code per group as an array, or an awaitable of that array, or None when it
  will answer later through ``batch.answer(positions, codes)`` (``forward``: the peer answers).
- ``RoutingPolicy``: ``route(batch)`` returns, per group, the index into ``targets`` of the policy
  that decides it, or one index for the whole batch (``rules``). Each target gets its sub-batch.
- ``Policy`` itself, for simple plug-ins: ``async decide(group) -> code`` for one ``FaultGroup``.
  The engine drives each call once; only a call that really awaits becomes a task, and at most
  ``MAX_AWAITING`` per queue are in flight (the rest wait inside their deadline).

Codes are SUCCESS or INVALID. The engine bounds every decision by the queue's response deadline and
turns an exception or another code into an INVALID answer, so a policy need not defend itself. A
policy must not block the event loop: anything slow is awaited.

A queue attached with a vEVENTQ hands its events to ``on_event``, one at a time in read order;
events take no answer. The default ignores them (routing policies do not route events). While a
policy works through the events of one read, that vEVENTQ is not read.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.fault import FaultGroup

if TYPE_CHECKING:
    import numpy

    from iopfd.engine.batch import Batch
    from iopfd.engine.events import Vevent


class Policy:
    """The base of every policy, and the kind for per-group plug-ins: override ``decide``."""

    name = "policy"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:  # the name of its [policies.NAME] table
            self.name = name

    async def decide(self, group: FaultGroup) -> int:
        raise NotImplementedError(f"policy {self.name!r} ({type(self).__name__}) defines no decide()")

    async def on_event(self, event: Vevent) -> None:
        """A vIOMMU event (or a LOST_EVENTS header) from the queue's vEVENTQ."""

    def bind(self, queue: str, iommufd: Iommufd | None) -> None:
        """The daemon starts serving ``queue`` with this policy. ``iommufd`` is the queue's iommufd when
        iopfd holds it (a brokered queue), else None. A policy that needs it (``ioas-map``) raises
        ValueError saying why it cannot serve the queue; the others ignore this."""

    def unbind(self, queue: str) -> None:
        """``queue`` is no longer served (it was detached)."""


class FixedPolicy(Policy):
    """Always the same answer."""

    def __init__(self, name: str, code: int) -> None:
        self.name = name
        self.code = code

    async def decide(self, group: FaultGroup) -> int:
        return self.code


class BatchPolicy(Policy):
    """Decides a whole batch at once. ``decide`` is the one-group case, for callers outside the engine."""

    def decide_batch(self, batch: Batch) -> numpy.ndarray | Sequence[int] | Awaitable[Any] | None:
        raise NotImplementedError

    async def decide(self, group: FaultGroup) -> int:
        from iopfd.engine.batch import batch_of, np

        answered = asyncio.get_running_loop().create_future()

        def answer(read: Any, index: Any, codes: Any) -> None:
            if not answered.done():
                answered.set_result(int(np().broadcast_to(codes, (len(index),))[0]))

        result = self.decide_batch(batch_of([group], answer))
        if result is None:
            return await answered
        if inspect.isawaitable(result):
            result = await result
        return int(np().asarray(result)[0])


class RoutingPolicy(Policy):
    """Sends each group to one of ``targets``; synchronous and cheap."""

    targets: Sequence[Policy] = ()

    def route(self, batch: Batch) -> numpy.ndarray | int:
        """The index into ``targets`` of each group's policy, or one index for them all."""
        raise NotImplementedError
