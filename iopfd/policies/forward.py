"""``forward``: a connected peer (the VMM, over the control socket) decides the groups.

The transport is the peer's business: anything with ``async forward(groups) -> codes`` and
``async forward_event(event)`` can be connected. Deadlines stay on iopfd's side: a peer that does not
answer in time costs its groups the queue's deadline code, like any slow policy. vEVENTs go to the
peer too (without a peer they are dropped); they take no answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from iopfd.engine.events import Vevent
from iopfd.engine.policy import CODES, BatchPolicy
from iopfd.iommufd.fault import FaultGroup


class Peer(Protocol):
    name: str

    async def forward(self, groups: Sequence[FaultGroup]) -> Sequence[int]:
        """Deliver the groups to the peer and return its code for each, in order."""

    async def forward_event(self, event: Vevent) -> None:
        """Deliver a vEVENT to the peer."""


class ForwardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when_disconnected: Literal["success", "invalid"] = "invalid"  # the answer while no peer is connected


class ForwardPolicy(BatchPolicy):
    Options = ForwardOptions

    def __init__(self, name: str, options: ForwardOptions | None = None) -> None:
        self.name = name
        self.disconnected_code = CODES[(options or ForwardOptions()).when_disconnected]
        self.peer: Peer | None = None

    def connect(self, peer: Peer) -> None:
        if self.peer is not None:
            raise RuntimeError(f"policy {self.name!r} already forwards to {self.peer.name!r}")
        self.peer = peer

    def disconnect(self, peer: Peer) -> None:
        if self.peer is peer:
            self.peer = None

    async def decide_batch(self, groups: Sequence[FaultGroup]) -> Sequence[int]:
        peer = self.peer
        if peer is None:
            return [self.disconnected_code] * len(groups)
        return await peer.forward(groups)

    async def on_event(self, event: Vevent) -> None:
        peer = self.peer
        if peer is not None:
            await peer.forward_event(event)
