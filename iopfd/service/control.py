"""The control socket: VMMs attach fault fds, ask iopfd to broker a queue, decide ``forward`` policies'
groups, and read status. Protocol: docs/protocol.md (iopfd/protocol.py); peers authorised by SO_PEERCRED."""

from __future__ import annotations

import asyncio
import errno
import itertools
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
from iopfd.engine.events import Vevent
from iopfd.iommufd import FaultQueue, Iommufd, IommufdError, VeventQueue
from iopfd.iommufd.viommu import TYPES as VEVENTQ_TYPES
from iopfd.iommufd.fault import FaultGroup
from iopfd.policies import ForwardPolicy, PolicyError
from iopfd.protocol import ProtocolError
from iopfd.service.config import Name

if TYPE_CHECKING:
    from iopfd.service.server import Server

log = structlog.get_logger("iopfd.control")
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_names = TypeAdapter(Name)
REFUSED_LINGER = 2.0  # seconds a refused peer's connection stays open to read the refusal
# accept() failing for want of fds or memory: the peer waits in the backlog until some are freed.
ACCEPT_RETRY = 0.5  # seconds
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
OPS = "attach, detach, broker, status, forward, respond"
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
        self.peer: SocketPeer | None = None
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
            if self.peer is not None:
                self.peer.disconnect()
            self.sock.close()
            self.log.info("control peer gone")

    async def handle(self, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        handler = {"attach": self.attach, "detach": self.detach, "broker": self.broker, "status": self.status,
                   "forward": self.forward, "respond": self.respond}.get(op) if isinstance(op, str) else None
        request_id = message.get("id")
        reply_fds: list[int] = []
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
            reply, reply_fds = await handler(message, fds)
            self.control.requests[op, "ok"] += 1
            if reply is None:  # forward answers get no reply
                return
            reply = {"ok": True, **reply}
        except ProtocolError as exc:
            self.control.requests[op if handler else "unknown", exc.code] += 1
            reply = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            self.log.warning("control request refused", op=op if handler else reprlib.repr(op), code=exc.code,
                             reason=exc.message)
        finally:
            _close(fds)  # handlers dup what they keep
        await self.send({"id": request_id, **reply}, reply_fds)

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

    async def forward(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        name = message.get("policy")
        if not isinstance(name, str):
            raise ProtocolError("bad-request", f"policy: the name of a policy of type forward, got "
                                               f"{reprlib.repr(name)}")
        policy = self._policy(name)
        if not isinstance(policy, ForwardPolicy):
            raise ProtocolError("not-a-forward-policy", f"policy {name!r} is not of type forward")
        if self.peer is not None:
            raise ProtocolError("bad-request", "this connection already forwards a policy")
        peer = SocketPeer(self, policy)
        try:
            policy.connect(peer)
        except RuntimeError as exc:
            raise ProtocolError("policy-taken", str(exc)) from None
        self.peer = peer
        self.log.info("forward peer connected", policy=name)
        return {"policy": name}, []

    async def respond(self, message: dict, fds: list[int]) -> tuple[dict | None, list[int]]:
        if self.peer is None:
            raise ProtocolError("bad-request", "respond answers a fault event, and this connection forwards no "
                                               "policy; send forward first")
        self.peer.answer(message)
        return None, []

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


class SocketPeer:
    """The ``forward`` transport: each group goes to the peer as an event; its answers come back."""

    def __init__(self, connection: Connection, policy: ForwardPolicy) -> None:
        self.connection = connection
        self.policy = policy
        self.name = f"control peer pid {connection.pid}"
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.gone = False  # a send failed: the peer is dead, its connection not yet drained

    async def forward(self, groups: Sequence[FaultGroup]) -> list[int]:
        loop = asyncio.get_running_loop()
        futures, ids = [], []
        try:
            for group in groups:
                group_id = next(self._ids)
                self._waiting[group_id] = future = loop.create_future()
                futures.append(future)
                ids.append(group_id)
                if self.gone:  # the rest of the batch gets the policy's when_disconnected answer
                    future.set_result(self.policy.disconnected_code)
                    continue
                try:
                    await self._send_event(group_id, group)
                except OSError:  # the peer died; answers it sent before still arrive and count
                    self.gone = True
                    future.set_result(self.policy.disconnected_code)
            return list(await asyncio.gather(*futures))
        finally:
            for group_id in ids:  # answered, or a deadline cancelled us: a late answer finds nothing
                self._waiting.pop(group_id, None)

    async def _send_event(self, group_id: int, group: FaultGroup) -> None:
        await self.connection.send({"event": "fault", "group": group_id, "queue": group.queue,
                                    "cookie": group.cookie, "dev_id": group.dev_id, "pasid": group.pasid,
                                    "grpid": group.grpid, "perm": group.perm,
                                    "faults": [{"addr": f.addr, "perm": f.perm, "flags": f.flags}
                                               for f in group.faults]})

    async def forward_event(self, event: Vevent) -> None:
        """A vEVENT goes to the peer as an event; nothing comes back."""
        if self.gone:
            return
        try:
            await self.connection.send({"event": "vevent", "queue": event.queue, "type": event.type,
                                        "sequence": event.sequence, "lost": event.lost,
                                        "data": None if event.data is None else event.data.hex()})
        except OSError:  # the peer died; its connection's end disconnects the policy
            self.gone = True

    def answer(self, message: dict) -> None:
        """Decide the group a ``respond`` names; a malformed one raises ProtocolError."""
        group, name = message.get("group"), message.get("code")
        if type(group) is not int:  # not bool: true would answer group 1
            raise ProtocolError("bad-request", f"group: the group number of a fault event, got {reprlib.repr(group)}")
        future = self._waiting.pop(group, None)
        code = protocol.CODES.get(name) if isinstance(name, str) else None
        if future is not None and not future.done():  # else answered after the deadline: the group is gone
            # None is no code: the engine answers this group INVALID as a policy error, and only this one
            # (an exception would fail the whole batch the group was forwarded in)
            future.set_result(code)
        if code is None:
            raise ProtocolError("bad-request", f"code: success or invalid, got {reprlib.repr(name)}")

    def disconnect(self) -> None:
        self.policy.disconnect(self)
        for future in self._waiting.values():
            if not future.done():
                future.set_result(self.policy.disconnected_code)
        self._waiting.clear()


async def _wait(sock: socket.socket, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(sock.fileno(), lambda: future.done() or future.set_result(None))
    try:
        await future
    finally:
        remove(sock.fileno())


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
