"""The control socket's ops (docs/protocol.md): attach, detach, broker, status and forward.

Each handler gets the daemon's ``ControlState`` (not the daemon itself), the peer that asks, the
decoded message and the fds that came with it, and returns a ``Reply`` or raises the ProtocolError
the peer gets. ``OPS`` is the one table of ops: the transport dispatches through it, and the
``unknown-op`` error lists its names.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from iopfd.iommufd import FaultQueue, Iommufd, IommufdError, VeventQueue
from iopfd.policies import ForwardPolicy, Policy, PolicyError
from iopfd.protocol import ProtocolError
from iopfd.service.control import requests
from iopfd.service.control.requests import NewQueue
from iopfd.service.peer_channel import EventChannel, FaultChannel
from iopfd.service.queues import QueueRegistry, ServedQueue


@dataclass
class ControlState:
    """What the ops may use of the daemon."""

    queues: QueueRegistry  # also the policies and settings as they are after a reload
    max_queues: int  # [control] max_queues
    add_channel: Callable[[FaultChannel], None]  # connect a forward peer's channel; RuntimeError: the policy has one
    supervise: Callable[[asyncio.Task, str], None]  # a background task whose failure must not go unnoticed


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, from SO_PEERCRED."""

    pid: int
    uid: int
    log: Any  # a logger bound to the peer's pid and uid


@dataclass
class Reply:
    fields: dict[str, Any]
    fds: list[int] = field(default_factory=list)  # sent with the reply; they stay iopfd's too
    handed_over: list[socket.socket] = field(default_factory=list)  # sent with the reply, then closed here

    def sent_fds(self) -> list[int]:
        return [*self.fds, *(sock.fileno() for sock in self.handed_over)]


async def attach(state: ControlState, peer: Peer, message: dict, fds: list[int]) -> Reply:
    requests.attach_fds(fds)
    request = requests.new_queue(message)
    event_type = requests.veventq_type(message, has_fd=len(fds) == 2)
    _check_room(state, request)
    try:
        source = FaultQueue.adopt(fds[0])
    except IommufdError as exc:
        raise ProtocolError("not-a-fault-fd", str(exc)) from None
    events = None
    if event_type is not None:
        try:
            events = VeventQueue.adopt(fds[1], event_type)
        except IommufdError as exc:
            raise ProtocolError("not-a-veventq-fd", str(exc)) from None
    fds.clear()  # the queue owns the fds now; the transport closes only what is left in fds
    _add(state, peer, request, source, events=events)
    return Reply({"queue": request.name})


async def broker(state: ControlState, peer: Peer, message: dict, fds: list[int]) -> Reply:
    request = requests.new_queue(message)
    _check_room(state, request)
    try:
        ctx = Iommufd.open()
    except IommufdError as exc:
        raise ProtocolError("broker-failed", str(exc)) from None
    try:
        source = FaultQueue.alloc(ctx)
    except IommufdError as exc:
        ctx.close()
        raise ProtocolError("broker-failed", str(exc)) from None
    _add(state, peer, request, source, iommufd=ctx)
    return Reply({"queue": request.name, "fault_id": source.id}, fds=[ctx.fd])


async def detach(state: ControlState, peer: Peer, message: dict, fds: list[int]) -> Reply:
    name = requests.queue_name(message)
    if name not in state.queues:
        raise ProtocolError("no-such-queue", f"no queue named {name!r} is served")
    owner = state.queues[name].owner_uid
    if peer.uid not in (0, os.getuid(), owner):  # one VMM must not detach another's queue
        whose = f"attached by uid {owner}" if owner is not None else "from iopfd's config"
        raise ProtocolError("not-owner", f"queue {name!r} is {whose}; only that uid, root or iopfd's own uid "
                                         "may detach it")
    stats = (await state.queues.remove(name)).queue.stats
    return Reply({"queue": name, "outcomes": stats.outcomes, "faults": stats.faults})


async def status(state: ControlState, peer: Peer, message: dict, fds: list[int]) -> Reply:
    return Reply({"queues": [_queue_status(served) for served in state.queues],
                  "totals": state.queues.engine.totals()})


async def forward(state: ControlState, peer: Peer, message: dict, fds: list[int]) -> Reply:
    """Open a peer channel for a ``forward`` policy: iopfd keeps one end of a socketpair and hands
    over the other (and, with ``events``, the other end of a second pair, for vEVENTs)."""
    request = requests.forward(message)
    policy = _policy(state, request.policy)
    if not isinstance(policy, ForwardPolicy):
        raise ProtocolError("not-a-forward-policy", f"policy {request.policy!r} is not of type forward")
    ours, theirs = _socketpair()
    event_ours, event_theirs = _socketpair() if request.events else (None, None)
    name = f"control peer pid {peer.pid}"
    channel = FaultChannel(ours, policy, read_records=request.read_records, name=name,
                           events=EventChannel(event_ours, policy, name=name) if event_ours is not None else None)
    try:
        state.add_channel(channel)
    except RuntimeError as exc:
        for sock in (ours, theirs, event_ours, event_theirs):
            if sock is not None:
                sock.close()
        raise ProtocolError("policy-taken", str(exc)) from None
    peer.log.info("forward peer channel handed over", policy=request.policy, read_records=request.read_records,
                  events=request.events)
    return Reply({"policy": request.policy, "read_records": request.read_records, "events": request.events},
                 handed_over=[theirs] if event_theirs is None else [theirs, event_theirs])


class Op(NamedTuple):
    handler: Callable[[ControlState, Peer, dict, list[int]], Awaitable[Reply]]
    takes_fds: bool = False  # any other op's fds are closed and the request refused


OPS = {"attach": Op(attach, takes_fds=True), "detach": Op(detach), "broker": Op(broker), "status": Op(status),
       "forward": Op(forward)}


def _check_room(state: ControlState, request: NewQueue) -> None:
    """A new queue needs a free name, room under the queue limit, and a policy that exists."""
    if request.name in state.queues:
        raise ProtocolError("queue-exists", f"a queue named {request.name!r} is already served; detach it first")
    if len(state.queues) >= state.max_queues:
        raise ProtocolError("too-many-queues", f"iopfd serves {state.max_queues} queues, the [control] max_queues "
                                               "limit; detach one, or raise max_queues (up to 512)")
    _policy(state, request.policy)


def _policy(state: ControlState, name: str | None) -> Policy:
    try:
        return state.queues.policy(name)
    except PolicyError as exc:
        raise ProtocolError("no-such-policy", str(exc)) from None


def _add(state: ControlState, peer: Peer, request: NewQueue, source: FaultQueue, *, iommufd: Iommufd | None = None,
         events: VeventQueue | None = None) -> None:
    try:
        state.queues.add(request.name, source, policy=request.policy, labels=request.labels,
                         device_names=request.devices, iommufd=iommufd, owner_uid=peer.uid, events=events)
    except PolicyError as exc:  # e.g. ioas-map for a queue that was not brokered: nothing was added
        for opened in (source, events, iommufd):
            if opened is not None:
                opened.close()
        raise ProtocolError("policy-cannot-serve", exc.lines[0][1]) from None
    peer.log.info("queue attached over the control socket", queue=request.name, brokered=iommufd is not None,
                  veventq=events.type_name if events is not None else None)


def _queue_status(served: ServedQueue) -> dict[str, Any]:
    queue, events = served.queue, served.events
    return {"name": served.name, "policy": queue.policy.name, "labels": dict(queue.config.labels),
            "reading": queue.reading, "pending": queue.pending, "faults": queue.stats.faults,
            "outcomes": queue.stats.outcomes, "write_errors": queue.stats.write_errors,
            "vevents": None if events is None else {"type": events.source.type_name, "reading": events.reading,
                                                    "events": events.stats.events, "lost": events.stats.lost}}


def _socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
