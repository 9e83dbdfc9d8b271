"""``forward``: a connected peer (the VMM) decides the groups, over a peer channel (docs/protocol.md).

``decide_batch`` hands the batch to the connected channel and returns None: the channel answers
through ``batch.answer`` as the peer's answers arrive. Deadlines stay on iopfd's side: a group the
peer does not answer in time gets the queue's deadline code from the engine, like any slow policy.
Without a peer every group gets the ``when_disconnected`` code at once. vEVENTs go to the peer's
event channel, if it opened one (else they are dropped); they take no answer.

The channels themselves (iopfd.service.peer_channel) are the service's: the policy holds the one
connected, and counters that outlive any one peer (``stats``, read by the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

from iopfd.engine.batch import np
from iopfd.engine.events import Vevent
from iopfd.engine.policy import BatchPolicy
from iopfd.iommufd.fault import CODES, CodeName

if TYPE_CHECKING:
    import numpy

    from iopfd.engine.batch import Batch


class Channel(Protocol):
    """Where a forward policy's groups go."""

    name: str
    queued: int  # groups waiting for room in the socket

    def forward(self, batch: Batch) -> None:
        """Deliver the batch's groups; answer them later through ``batch.answer``."""


class EventSink(Protocol):
    name: str

    def send(self, event: Vevent) -> None:
        """Deliver a vEVENT, without blocking."""


@dataclass(slots=True)
class ChannelStats:
    """What the policy's peers did, summed over every peer that has been connected."""

    sent: int = 0  # groups sent to a peer
    answered: int = 0  # groups answered by a peer (in time)
    late_answers: int = 0  # answers for ids not open: answered at the deadline, answered twice, or never sent
    bad_codes: int = 0  # groups a peer answered with a code neither SUCCESS nor INVALID (answered INVALID)
    oversized: int = 0  # groups larger than the peer reads at once (answered INVALID)
    malformed_packets: int = 0  # answer packets not a whole number of page responses
    disconnects: int = 0
    events_sent: int = 0
    events_dropped: int = 0  # the event channel was full


class ForwardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when_disconnected: CodeName = "invalid"  # the answer while no peer is connected


class ForwardPolicy(BatchPolicy):
    Options = ForwardOptions

    def __init__(self, name: str, options: ForwardOptions | None = None) -> None:
        self.name = name
        self.disconnected_code = CODES[(options or ForwardOptions()).when_disconnected]
        self.channel: Channel | None = None
        self.event_channel: EventSink | None = None
        self.stats = ChannelStats()

    @property
    def queued(self) -> int:
        """Groups waiting to be sent to the peer (its socket is full)."""
        return self.channel.queued if self.channel is not None else 0

    def connect(self, channel: Channel, events: EventSink | None = None) -> None:
        if self.channel is not None:
            raise RuntimeError(f"policy {self.name!r} already forwards to {self.channel.name!r}")
        self.channel = channel
        if events is not None:
            self.event_channel = events

    def disconnect(self, channel: object) -> None:
        """``channel`` (the fault or the event channel) is gone."""
        if self.channel is channel:
            self.channel = None
        if self.event_channel is channel:
            self.event_channel = None

    def decide_batch(self, batch: Batch) -> numpy.ndarray | None:
        channel = self.channel
        if channel is None:
            return np().full(len(batch), self.disconnected_code, np().uint32)
        channel.forward(batch)
        return None

    async def on_event(self, event: Vevent) -> None:
        events = self.event_channel
        if events is not None:
            events.send(event)
