"""The control socket: VMMs attach fault fds, ask iopfd to broker a queue, open a ``forward`` policy's
peer channel, and read status. Protocol: docs/protocol.md (iopfd/protocol.py); peers authorised by
SO_PEERCRED."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import reprlib
import socket
import stat
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from pydantic import TypeAdapter, ValidationError

from iopfd import protocol
from iopfd.iommufd import FaultQueue, Iommufd, IommufdError, VeventQueue
from iopfd.iommufd.viommu import TYPES as VEVENTQ_TYPES
from iopfd.policies import ForwardPolicy, PolicyError
from iopfd.protocol import ProtocolError
from iopfd.service.config import Name
from iopfd.service.peer_channel import EventChannel, FaultChannel

if TYPE_CHECKING:
    from iopfd.service.server import Server

log = structlog.get_logger("iopfd.control")
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_names = TypeAdapter(Name)
REFUSED_LINGER = 2.0  # seconds a refused peer's connection stays open to read the refusal
# accept() failing for want of fds or memory: the peer waits in the backlog until some are freed.
ACCEPT_RETRY = 0.5  # seconds
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
OPS = "attach, detach, broker, status, forward"
DEV_ID = re.compile(r"[0-9]{1,10}")  # a dev_id (u32) in decimal


def bind_socket(path: str, mode: int) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file left by a previous life (nobody answering)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket; remove it or set [control] path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise OSError(f"{path}: another iopfd is listening there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(16)
    return sock


class ControlServer:
    def __init__(self, server: Server, listener: socket.socket, *, allowed_uids: set[int], allowed_gids: set[int],
                 owns_path: str | None = None) -> None:
        self.server = server
        self.listener = listener
        self.allowed_uids = allowed_uids
        self.allowed_gids = allowed_gids
        self._owns_path = owns_path
        self._tasks: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None
        # (op, "ok" or the refusal's error code) -> requests: iopfd_control_requests_total
        self.requests: Counter[tuple[str, str]] = Counter()

    def start(self) -> None:
        self.listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        self.server.supervise(self._accepting, "control socket accept loop")

    async def close(self) -> None:
        tasks = [task for task in (self._accepting, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.close()
        if self._owns_path:
            try:
                os.unlink(self._owns_path)
            except FileNotFoundError:
                pass

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.listener)
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                log.warning("cannot accept a control connection; retrying", error=str(exc), retry_in=ACCEPT_RETRY)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            task = loop.create_task(Connection(self, conn).serve())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.server.supervise(task, "control connection")


@dataclass(frozen=True)
class NewQueue:
    """An attach or broker request, checked."""

    name: str
    policy: str | None  # None: the config's default policy
    labels: dict[str, str]
    devices: dict[int, str]


class Connection:
    def __init__(self, control: ControlServer, sock: socket.socket) -> None:
        self.control = control
        self.server = control.server
        self.sock = sock
        self.sock.setblocking(False)
        pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        self.pid = pid
        self.uid = uid
        self.log = log.bind(peer_pid=pid, peer_uid=uid)
        self.authorised = uid in control.allowed_uids or gid in control.allowed_gids

    async def serve(self) -> None:
        try:
            if not self.authorised:
                self.log.warning("control peer refused: uid and gid not in [control] allowed_uids/allowed_gids")
                self.control.requests["unknown", "unauthorized"] += 1  # its requests go unread
                await self.send({"ok": False, "error": {"code": "unauthorized", "message":
                                 "this uid/gid is not allowed; add it to [control] allowed_uids or allowed_gids"}})
                await self._discard_requests()
                return
            self.log.info("control peer connected")
            while True:
                await self._readable()
                try:
                    received = protocol.receive(self.sock)
                except BlockingIOError:
                    continue
                except ProtocolError as exc:
                    self.control.requests["unknown", exc.code] += 1
                    await self.send({"ok": False, "error": {"code": exc.code, "message": exc.message}})
                    continue
                except ConnectionResetError:
                    # The peer died with our messages unread. Linux reports that once, then still
                    # delivers what the peer sent before dying: its last answers count.
                    continue
                except OSError:
                    break
                if received is None:
                    break
                await self.handle(*received)
        except ConnectionError:  # the peer left without reading its reply
            pass
        finally:
            self.sock.close()
            self.log.info("control peer gone")

    async def handle(self, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        handler = {"attach": self.attach, "detach": self.detach, "broker": self.broker, "status": self.status,
                   "forward": self.forward}.get(op) if isinstance(op, str) else None
        request_id = message.get("id")
        reply_fds: list[int] = []
        handed_over: list[socket.socket] = []  # sent with the reply, then closed here
        try:
            if not _echoable(request_id):
                request_id = None
                raise ProtocolError("bad-request", f"id: at most {protocol.MAX_ID} bytes of JSON, nested at most "
                                                   f"{protocol.MAX_ID_DEPTH} deep (every reply echoes it)")
            if handler is None:
                raise ProtocolError("unknown-op", f"unknown op {reprlib.repr(op)}; ops: {OPS}")
            if fds and op != "attach":
                raise ProtocolError("bad-request", f"{op} carries no file descriptors, got {len(fds)} (closed); "
                                                   "only attach sends fds")
            if op == "forward":
                reply, handed_over = await self.forward(message)
                reply_fds = [sock.fileno() for sock in handed_over]
            else:
                reply, reply_fds = await handler(message, fds)
            self.control.requests[op, "ok"] += 1
            reply = {"ok": True, **reply}
        except ProtocolError as exc:
            self.control.requests[op if handler else "unknown", exc.code] += 1
            reply = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            self.log.warning("control request refused", op=op if handler else reprlib.repr(op), code=exc.code,
                             reason=exc.message)
        finally:
            _close(fds)  # handlers dup what they keep
        try:
            await self.send({"id": request_id, **reply}, reply_fds)
        finally:
            for sock in handed_over:
                sock.close()

    # -- ops -----------------------------------------------------------------------------------
    async def attach(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        if len(fds) not in (1, 2):
            raise ProtocolError("missing-fd", f"attach carries the fault fd and optionally a vEVENTQ fd, got "
                                              f"{len(fds)} fds")
        request = self._new_queue(message)
        event_type = _veventq_type(message, len(fds) == 2)
        try:
            source = FaultQueue.from_fd(fds[0])
        except IommufdError as exc:
            raise ProtocolError("not-a-fault-fd", str(exc)) from None
        events = None
        if event_type is not None:
            try:
                events = VeventQueue.from_fd(fds[1], event_type)
            except IommufdError as exc:
                raise ProtocolError("not-a-veventq-fd", str(exc)) from None
        fds.clear()  # the queue owns the fds now; handle() closes only what is left in fds
        self._add(request, source, events=events)
        return {"queue": request.name}, []

    async def broker(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        request = self._new_queue(message)
        try:
            ctx = Iommufd.open()
        except IommufdError as exc:
            raise ProtocolError("broker-failed", str(exc)) from None
        try:
            source = FaultQueue.alloc(ctx)
        except IommufdError as exc:
            ctx.close()
            raise ProtocolError("broker-failed", str(exc)) from None
        self._add(request, source, keep_open=ctx)
        return {"queue": request.name, "fault_id": source.id}, [ctx.fd]

    async def detach(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        name = _queue_name(message)
        if name not in self.server.engine.queues:
            raise ProtocolError("no-such-queue", f"no queue named {name!r} is served")
        owner = self.server.owners.get(name)
        if self.uid not in (0, os.getuid(), owner):  # one VMM must not detach another's queue
            whose = f"attached by uid {owner}" if owner is not None else "from iopfd's config"
            raise ProtocolError("not-owner", f"queue {name!r} is {whose}; only that uid, root or iopfd's own uid "
                                             "may detach it")
        queue = await self.server.remove_queue(name)
        return {"queue": name, "outcomes": queue.stats.outcomes, "faults": queue.stats.faults}, []

    async def status(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        queues = [{"name": name, "policy": queue.policy.name, "labels": dict(queue.config.labels),
                   "reading": queue.reading, "pending": queue.pending, "faults": queue.stats.faults,
                   "outcomes": queue.stats.outcomes, "write_errors": queue.stats.write_errors,
                   "vevents": _vevents_status(self.server.engine.event_queues.get(name))}
                  for name, queue in self.server.engine.queues.items()]
        return {"queues": queues, "totals": self.server.engine.totals()}, []

    async def forward(self, message: dict) -> tuple[dict, list[socket.socket]]:
        """Open a peer channel for a ``forward`` policy: iopfd keeps one end of a socketpair and hands
        over the other (and, with ``events``, the other end of a second pair, for vEVENTs)."""
        name = message.get("policy")
        if not isinstance(name, str):
            raise ProtocolError("bad-request", f"policy: the name of a policy of type forward, got "
                                               f"{reprlib.repr(name)}")
        policy = self._policy(name)
        if not isinstance(policy, ForwardPolicy):
            raise ProtocolError("not-a-forward-policy", f"policy {name!r} is not of type forward")
        read_records = message.get("read_records", protocol.DEFAULT_READ_RECORDS)
        if type(read_records) is not int or not 1 <= read_records <= protocol.MAX_READ_RECORDS:
            raise ProtocolError("bad-request", f"read_records: how many fault records the peer reads at once, 1 to "
                                               f"{protocol.MAX_READ_RECORDS}; got {reprlib.repr(read_records)}")
        events = message.get("events", False)
        if type(events) is not bool:
            raise ProtocolError("bad-request", f"events: true or false, got {reprlib.repr(events)}")
        ours, theirs = _socketpair()
        event_ours, event_theirs = _socketpair() if events else (None, None)
        peer = f"control peer pid {self.pid}"
        channel = FaultChannel(ours, policy, read_records=read_records, name=peer,
                               events=EventChannel(event_ours, policy, name=peer) if event_ours is not None else None)
        try:
            self.server.add_channel(channel)
        except RuntimeError as exc:
            for sock in (ours, theirs, event_ours, event_theirs):
                if sock is not None:
                    sock.close()
            raise ProtocolError("policy-taken", str(exc)) from None
        self.log.info("forward peer channel handed over", policy=name, read_records=read_records, events=events)
        return ({"policy": name, "read_records": read_records, "events": events},
                [theirs] if event_theirs is None else [theirs, event_theirs])

    # -- helpers -------------------------------------------------------------------------------
    def _new_queue(self, message: dict) -> NewQueue:
        """Every field of an attach or broker request checked, before anything is opened."""
        name = _queue_name(message)
        if name in self.server.engine.queues:
            raise ProtocolError("queue-exists", f"a queue named {name!r} is already served; detach it first")
        limit = self.server.settings.control.max_queues
        if len(self.server.engine.queues) >= limit:
            raise ProtocolError("too-many-queues", f"iopfd serves {limit} queues, the [control] max_queues limit; "
                                                   "detach one, or raise max_queues (up to 512)")
        policy = message.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise ProtocolError("bad-request", f"policy: a policy name, got {reprlib.repr(policy)}")
        self._policy(self.server.settings.policy if policy is None else policy)
        labels = _object_of_strings(message, "labels", '{"vm": "guest1"}')
        if "queue" in labels:  # log lines name the queue under that key
            raise ProtocolError("bad-request", 'labels: "queue" is the queue\'s name in log lines; use another key')
        devices = _object_of_strings(message, "devices", '{"4": "0000:00:04.0"}')
        bad = next((key for key in devices if not DEV_ID.fullmatch(key)), None)
        if bad is not None:
            raise ProtocolError("bad-request", f"devices: keys are dev_ids in decimal, got {reprlib.repr(bad)}")
        return NewQueue(name, policy, labels, {int(key): value for key, value in devices.items()})

    def _policy(self, name: str):
        try:
            return self.server.policies.get(_names.validate_python(name))
        except ValidationError:  # no config can name a policy so; the message stays short
            raise ProtocolError("no-such-policy", f"no policy is named {reprlib.repr(name)}: names are 1 to 64 "
                                                  "of A-Z a-z 0-9 _ . -") from None
        except PolicyError as exc:
            raise ProtocolError("no-such-policy", str(exc)) from None

    def _add(self, request: NewQueue, source: FaultQueue, keep_open: Iommufd | None = None,
             events: VeventQueue | None = None) -> None:
        try:
            self.server.add_queue(request.name, source, policy=request.policy, labels=request.labels,
                                  device_names=request.devices, keep_open=keep_open, owner_uid=self.uid, events=events)
        except PolicyError as exc:  # e.g. ioas-map for a queue that was not brokered: nothing was added
            for opened in (source, events, keep_open):
                if opened is not None:
                    opened.close()
            raise ProtocolError("policy-cannot-serve", exc.lines[0][1]) from None
        self.log.info("queue attached over the control socket", queue=request.name, brokered=keep_open is not None,
                      veventq=events.type_name if events is not None else None)

    async def _discard_requests(self) -> None:
        """Read what the refused peer sent (closing any fds), so closing does not reset the connection
        before it has read the refusal."""
        self.sock.shutdown(socket.SHUT_WR)
        try:
            async with asyncio.timeout(REFUSED_LINGER):
                while True:
                    await self._readable()
                    data, fds, _, _ = socket.recv_fds(self.sock, protocol.MAX_MESSAGE + 1, protocol.MAX_FDS)
                    _close(fds)
                    if not data:
                        return
        except (TimeoutError, OSError):
            pass

    async def _readable(self) -> None:
        await _wait(self.sock, writable=False)

    async def send(self, message: dict, fds: Sequence[int] = ()) -> None:
        while True:
            try:
                protocol.send(self.sock, message, list(fds))
                return
            except BlockingIOError:
                await _wait(self.sock, writable=True)


async def _wait(sock: socket.socket, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(sock.fileno(), lambda: future.done() or future.set_result(None))
    try:
        await future
    finally:
        remove(sock.fileno())


def _socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def _veventq_type(message: dict, has_fd: bool) -> int | None:
    """The type of the vEVENTQ fd an attach carries second: the fd alone does not say it."""
    name = message.get("veventq_type")
    if not has_fd:
        if name is not None:
            raise ProtocolError("missing-fd", "veventq_type names the type of the vEVENTQ fd sent second, after "
                                              "the fault fd; only one fd came")
        return None
    if not isinstance(name, str) or name not in VEVENTQ_TYPES:
        raise ProtocolError("bad-request", f"veventq_type: the type of the vEVENTQ fd, one of "
                                           f"{', '.join(sorted(VEVENTQ_TYPES))}; got {reprlib.repr(name)}")
    return VEVENTQ_TYPES[name]


def _vevents_status(events) -> dict | None:
    if events is None:
        return None
    return {"type": events.source.type_name, "reading": events.reading, "events": events.stats.events,
            "lost": events.stats.lost}


def _queue_name(message: dict) -> str:
    try:
        return _names.validate_python(message.get("queue"))
    except ValidationError:
        raise ProtocolError("bad-request", f"queue: 1 to 64 of A-Z a-z 0-9 _ . -, got "
                                           f"{reprlib.repr(message.get('queue'))}") from None


def _object_of_strings(message: dict, key: str, example: str) -> dict[str, str]:
    value = message.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise ProtocolError("bad-request", f"{key}: an object of strings, e.g. {example}, got {reprlib.repr(value)}")
    return value


def _echoable(request_id: object) -> bool:
    """Whether every reply can echo this id: short, and nested so little that encoding it (a few calls
    deeper in the stack than it was decoded) cannot hit the recursion limit."""
    containers, depth = [request_id], 0
    while containers := [value for value in containers if isinstance(value, (dict, list))]:
        depth += 1
        if depth > protocol.MAX_ID_DEPTH:
            return False
        containers = [child for value in containers for child in (value.values() if isinstance(value, dict) else value)]
    return len(json.dumps(request_id)) <= protocol.MAX_ID


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
