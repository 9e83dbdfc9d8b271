"""The control socket's transport: the listening socket, the peers it accepts (authorised by
SO_PEERCRED), and per connection one message in, one reply out (iopfd/protocol.py), dispatched
through the ops table (``ops.OPS``). The protocol: docs/protocol.md."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import reprlib
import socket
import stat
import struct
from collections import Counter
from collections.abc import Sequence

import structlog

from iopfd import protocol
from iopfd.protocol import ProtocolError
from iopfd.service.arguments import UsageError
from iopfd.service.config import ControlSettings
from iopfd.service.control import requests
from iopfd.service.control.ops import OPS, ControlState, Peer, Reply

log = structlog.get_logger("iopfd.control")
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
REFUSED_LINGER = 2.0  # seconds a refused peer's connection stays open to read the refusal
# accept() failing for want of fds or memory: the peer waits in the backlog until some are freed.
ACCEPT_RETRY = 0.5  # seconds
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def open_control_socket(settings: ControlSettings, inherited: list[int] | None, state: ControlState) -> ControlSocket:
    """The socket systemd passed (iopfd.socket, FileDescriptorName=control), else bind [control] path.
    Raises UsageError when the path cannot be listened on."""
    uids, gids = {*settings.allowed_uids, os.getuid()}, set(settings.allowed_gids)
    if inherited:
        listener = socket.socket(fileno=inherited[0])
        log.info("control socket from systemd", fd=inherited[0])
        return ControlSocket(state, listener, allowed_uids=uids, allowed_gids=gids)
    try:
        listener = bind_socket(settings.path, settings.mode)
    except OSError as exc:
        raise UsageError(f"control socket {settings.path}: {exc}; set [control] path, or path = \"off\"") from None
    log.info("control socket", path=settings.path, mode=oct(settings.mode))
    return ControlSocket(state, listener, allowed_uids=uids, allowed_gids=gids, owns_path=settings.path)


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


class ControlSocket:
    """The listening control socket and its connections."""

    def __init__(self, state: ControlState, listener: socket.socket, *, allowed_uids: set[int],
                 allowed_gids: set[int], owns_path: str | None = None) -> None:
        self.state = state
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
        self.state.supervise(self._accepting, "control socket accept loop")

    async def close(self) -> None:
        tasks = [task for task in (self._accepting, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._owns_path)

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
            self.state.supervise(task, "control connection")


class Connection:
    """One peer's connection: requests in, replies out, in order."""

    def __init__(self, control: ControlSocket, sock: socket.socket) -> None:
        self.control = control
        self.sock = sock
        self.sock.setblocking(False)
        pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        self.peer = Peer(pid, uid, log.bind(peer_pid=pid, peer_uid=uid))
        self.authorised = uid in control.allowed_uids or gid in control.allowed_gids

    async def serve(self) -> None:
        peer_log = self.peer.log
        try:
            if not self.authorised:
                peer_log.warning("control peer refused: uid and gid not in [control] allowed_uids/allowed_gids")
                self.control.requests["unknown", "unauthorized"] += 1  # its requests go unread
                await self.send({"ok": False, "error": {"code": "unauthorized", "message":
                                 "this uid/gid is not allowed; add it to [control] allowed_uids or allowed_gids"}})
                await self._discard_requests()
                return
            peer_log.info("control peer connected")
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
            peer_log.info("control peer gone")

    async def handle(self, message: dict, fds: list[int]) -> None:
        name = message.get("op")
        known = name if isinstance(name, str) and name in OPS else None
        op = OPS[known] if known is not None else None
        counted = known or "unknown"  # iopfd_control_requests_total{op}: known ops only
        request_id = message.get("id")
        reply = Reply({})
        try:
            if not requests.echoable(request_id):
                request_id = None
                raise requests.id_refused()
            if op is None:
                raise ProtocolError("unknown-op", f"unknown op {reprlib.repr(name)}; ops: {', '.join(OPS)}")
            if fds and not op.takes_fds:
                raise ProtocolError("bad-request", f"{name} carries no file descriptors, got {len(fds)} (closed); "
                                                   f"only {', '.join(n for n, o in OPS.items() if o.takes_fds)} "
                                                   "sends fds")
            reply = await op.handler(self.control.state, self.peer, message, fds)
            self.control.requests[counted, "ok"] += 1
            answer = {"ok": True, **reply.fields}
        except ProtocolError as exc:
            self.control.requests[counted, exc.code] += 1
            answer = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            self.peer.log.warning("control request refused", op=known or reprlib.repr(name),
                                  code=exc.code, reason=exc.message)
        finally:
            _close(fds)  # handlers take out of fds what they keep
        try:
            await self.send({"id": request_id, **answer}, reply.sent_fds())
        finally:
            for sock in reply.handed_over:
                sock.close()

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

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    add(sock.fileno(), ready)
    try:
        await future
    finally:
        remove(sock.fileno())


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
