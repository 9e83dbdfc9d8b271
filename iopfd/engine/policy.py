"""What the engine asks of a policy: a response code for each fault group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.fault import INVALID, SUCCESS, FaultGroup

if TYPE_CHECKING:
    from iopfd.engine.events import Vevent

CODES = {"success": SUCCESS, "invalid": INVALID}


class Policy:
    """Decides fault groups. ``decide`` returns SUCCESS or INVALID for one group.

    A policy that can decide many groups at once also defines ``decide_batch(groups)`` returning one
    code per group, in order; the engine then calls it once per read() instead of ``decide`` per
    group. The engine bounds every call by the queue's response deadline and turns an exception or
    a code other than SUCCESS/INVALID into an INVALID answer, so a policy need not defend itself.
    A policy must not block the event loop: anything slow is awaited.

    A policy whose answer never depends on the group (like ``accept`` and ``reject``) sets
    ``fixed_code``: the engine then answers each read straight from its cookie column, in the loop
    turn that read it, without calling the policy or making a FaultGroup per group.

    A routing policy (like ``rules``) instead defines ``select(group) -> Policy``, synchronous and
    cheap: the engine then runs the selected policy, batching the groups each one gets.

    A queue attached with a vEVENTQ hands its events to ``on_event``, one at a time in read order;
    events take no answer. The default ignores them (routing policies do not route events). While a
    policy works through the events of one read, that vEVENTQ is not read.
    """

    name = "policy"
    fixed_code: int | None = None

    async def decide(self, group: FaultGroup) -> int:
        raise NotImplementedError

    async def on_event(self, event: Vevent) -> None:
        """A vIOMMU event (or a LOST_EVENTS header) from the queue's vEVENTQ."""

    def bind(self, queue: str, iommufd: Iommufd | None) -> None:
        """The daemon starts serving ``queue`` with this policy. ``iommufd`` is the queue's iommufd when
        iopfd holds it (a brokered queue), else None. A policy that needs it (``ioas-map``) raises
        ValueError saying why it cannot serve the queue; the others ignore this."""

    def unbind(self, queue: str) -> None:
        """``queue`` is no longer served (detached, or the daemon stops)."""


class BatchPolicy(Policy):
    """A policy whose decisions come in batches; ``decide`` is the one-group case of the batch."""

    async def decide_batch(self, groups: Sequence[FaultGroup]) -> Sequence[int]:
        raise NotImplementedError

    async def decide(self, group: FaultGroup) -> int:
        (code,) = await self.decide_batch([group])
        return code
