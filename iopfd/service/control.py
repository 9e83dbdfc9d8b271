"""The control socket: VMMs attach fault fds, ask iopfd to broker a queue, decide ``forward`` policies'
groups, and read status. Protocol: docs/protocol.md (iopfd/protocol.py); peers authorised by SO_PEERCRED."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import stat
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from pydantic import TypeAdapter, ValidationError

from iopfd import protocol
from iopfd.iommufd import FaultQueue, Iommufd, IommufdError
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

    def start(self) -> None:
        self.listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

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
            conn, _ = await loop.sock_accept(self.listener)
            task = loop.create_task(Connection(self, conn).serve())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class Connection:
    def __init__(self, control: ControlServer, sock: socket.socket) -> None:
        self.control = control
        self.server = control.server
        self.sock = sock
        self.sock.setblocking(False)
        self.peer: SocketPeer | None = None
        pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        self.pid = pid
        self.log = log.bind(peer_pid=pid, peer_uid=uid)
        self.authorised = uid in control.allowed_uids or gid in control.allowed_gids

    async def serve(self) -> None:
        try:
            if not self.authorised:
                self.log.warning("control peer refused: uid and gid not in [control] allowed_uids/allowed_gids")
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
                    await self.send({"ok": False, "error": {"code": exc.code, "message": exc.message}})
                    continue
                except OSError:
                    break
                if received is None:
                    break
                await self.handle(*received)
        finally:
            if self.peer is not None:
                self.peer.disconnect()
            self.sock.close()
            self.log.info("control peer gone")

    async def handle(self, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        if op == "respond" and self.peer is not None:  # forward answers get no reply
            _close(fds)
            self.peer.answer(message)
            return
        handler = {"attach": self.attach, "detach": self.detach, "broker": self.broker, "status": self.status,
                   "forward": self.forward}.get(op)
        reply_fds: list[int] = []
        try:
            if handler is None:
                raise ProtocolError("unknown-op", f"unknown op {op!r}; ops: attach, detach, broker, status, forward")
            reply, reply_fds = await handler(message, fds)
            reply = {"ok": True, **reply}
        except ProtocolError as exc:
            reply = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            self.log.warning("control request refused", op=op, code=exc.code, reason=exc.message)
        finally:
            _close(fds)  # handlers dup what they keep
        await self.send({"id": message.get("id"), **reply}, reply_fds)

    # -- ops -----------------------------------------------------------------------------------
    async def attach(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        if len(fds) != 1:
            raise ProtocolError("missing-fd", f"attach carries exactly one fd (the fault fd), got {len(fds)}")
        name = self._new_queue_name(message)
        try:
            source = FaultQueue.from_fd(fds[0])
        except IommufdError as exc:
            raise ProtocolError("not-a-fault-fd", str(exc)) from None
        fds.clear()  # the queue owns the fd now; handle() closes only what is left in fds
        self._add(name, source, message)
        return {"queue": name}, []

    async def broker(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        name = self._new_queue_name(message)
        try:
            ctx = Iommufd.open()
        except IommufdError as exc:
            raise ProtocolError("broker-failed", str(exc)) from None
        try:
            source = FaultQueue.alloc(ctx)
        except IommufdError as exc:
            ctx.close()
            raise ProtocolError("broker-failed", str(exc)) from None
        self._add(name, source, message, keep_open=ctx)
        return {"queue": name, "fault_id": source.id}, [ctx.fd]

    async def detach(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        name = message.get("queue")
        if name not in self.server.engine.queues:
            raise ProtocolError("no-such-queue", f"no queue named {name!r} is served")
        queue = await self.server.remove_queue(name)
        return {"queue": name, "outcomes": queue.stats.outcomes, "faults": queue.stats.faults}, []

    async def status(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        queues = [{"name": name, "policy": queue.policy.name, "labels": dict(queue.config.labels),
                   "reading": queue.reading, "pending": queue.pending, "faults": queue.stats.faults,
                   "outcomes": queue.stats.outcomes, "write_errors": queue.stats.write_errors}
                  for name, queue in self.server.engine.queues.items()]
        return {"queues": queues, "totals": self.server.engine.totals()}, []

    async def forward(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        name = message.get("policy")
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

    # -- helpers -------------------------------------------------------------------------------
    def _new_queue_name(self, message: dict) -> str:
        try:
            name = _names.validate_python(message.get("queue"))
        except ValidationError:
            raise ProtocolError("bad-request", "queue: 1 to 64 of A-Z a-z 0-9 _ . -") from None
        if name in self.server.engine.queues:
            raise ProtocolError("queue-exists", f"a queue named {name!r} is already served; detach it first")
        self._policy(message.get("policy") or self.server.settings.policy)
        return name

    def _policy(self, name):
        try:
            return self.server.policies.get(str(name))
        except PolicyError as exc:
            raise ProtocolError("no-such-policy", str(exc)) from None

    def _add(self, name: str, source: FaultQueue, message: dict, keep_open: Iommufd | None = None) -> None:
        labels = message.get("labels") or {}
        devices = message.get("devices") or {}
        try:
            self.server.add_queue(name, source, policy=message.get("policy"),
                                  labels={str(k): str(v) for k, v in labels.items()},
                                  device_names={int(k): str(v) for k, v in devices.items()}, keep_open=keep_open)
        except (AttributeError, ValueError) as exc:
            source.close()
            if keep_open is not None:
                keep_open.close()
            raise ProtocolError("bad-request", f"labels and devices are JSON objects: {exc}") from None
        self.log.info("queue attached over the control socket", queue=name, brokered=keep_open is not None)

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

    async def forward(self, groups: Sequence[FaultGroup]) -> list[int]:
        loop = asyncio.get_running_loop()
        futures, ids = [], []
        try:
            for group in groups:
                group_id = next(self._ids)
                self._waiting[group_id] = future = loop.create_future()
                futures.append(future)
                ids.append(group_id)
                await self.connection.send({"event": "fault", "group": group_id, "queue": group.queue,
                                            "cookie": group.cookie, "dev_id": group.dev_id, "pasid": group.pasid,
                                            "grpid": group.grpid, "perm": group.perm,
                                            "faults": [{"addr": f.addr, "perm": f.perm, "flags": f.flags}
                                                       for f in group.faults]})
            return list(await asyncio.gather(*futures))
        finally:
            for group_id in ids:  # answered, or a deadline cancelled us: a late answer finds nothing
                self._waiting.pop(group_id, None)

    def answer(self, message: dict) -> None:
        future = self._waiting.pop(message.get("group"), None)
        code = protocol.CODES.get(message.get("code"))
        if future is None or future.done():
            return  # answered after the deadline: the group is gone
        if code is None:
            future.set_exception(ProtocolError("bad-request", f"code must be success or invalid, got {message.get('code')!r}"))
        else:
            future.set_result(code)

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


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
