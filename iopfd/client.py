"""A client for iopfd's control socket (docs/protocol.md), for VMM-side code and the tests.

    with Client("/run/iopfd/control.sock") as iopfd:
        iopfd.attach(fault_fd, "vm1", labels={"vm": "guest1"})
        print(iopfd.status())

Blocking and single-threaded, like the C or Rust code it stands in for: each call sends one request
and waits for its reply. A ``forward`` session turns the connection into an event stream.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping

from iopfd import protocol
from iopfd.protocol import ProtocolError

DEFAULT_PATH = "/run/iopfd/control.sock"
CONNECT_POLL = 0.005  # seconds between connect attempts while the daemon's backlog is full


class Client:
    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH, *, timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self._connect(os.fspath(path), timeout)
        except OSError:
            self.sock.close()
            raise
        self._next_id = 0

    def _connect(self, path: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:  # with a timeout, a full backlog (a burst of peers) fails at once: wait for room
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{path}: iopfd did not accept the connection within {timeout} s") from None
                time.sleep(CONNECT_POLL)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, op: str, fds: tuple[int, ...] = (), **fields) -> tuple[dict, list[int]]:
        """Send one request; return the reply and any fds it carried. Error replies raise ProtocolError."""
        self._next_id += 1
        protocol.send(self.sock, {"op": op, "id": self._next_id, **fields}, fds)
        received = protocol.receive(self.sock)
        if received is None:
            raise ProtocolError("closed", "iopfd closed the connection")
        reply, reply_fds = received
        if not reply.get("ok"):
            for fd in reply_fds:
                os.close(fd)
            error = reply.get("error") or {}
            raise ProtocolError(error.get("code", "unknown"), error.get("message", repr(reply)))
        return reply, reply_fds

    def attach(self, fault_fd: int, queue: str, *, policy: str | None = None,
               labels: Mapping[str, str] | None = None, devices: Mapping[int, str] | None = None,
               veventq_fd: int | None = None, veventq_type: str | None = None) -> dict:
        """Hand a fault fd to iopfd, which serves it as ``queue``; our copy of the fd stays ours.
        With ``veventq_fd`` (its type named by ``veventq_type``, e.g. "selftest" or "arm-smmuv3"),
        iopfd serves that vEVENTQ beside it."""
        fds = (fault_fd,) if veventq_fd is None else (fault_fd, veventq_fd)
        extra = {} if veventq_fd is None else {"veventq_type": veventq_type}
        reply, _ = self.request("attach", fds, queue=queue, policy=policy, labels=dict(labels or {}),
                                devices={str(dev_id): name for dev_id, name in (devices or {}).items()}, **extra)
        return reply

    def detach(self, queue: str) -> dict:
        """Stop serving ``queue``: iopfd answers what it has pending and closes its copy of the fd."""
        return self.request("detach", queue=queue)[0]

    def broker(self, queue: str, *, policy: str | None = None, labels: Mapping[str, str] | None = None) -> tuple[int, int]:
        """iopfd opens /dev/iommu and a fault queue it serves; returns ``(iommufd_fd, fault_id)``.
        Allocate nested HWPTs in that iommufd with ``fault_id``; the fd is ours to close."""
        reply, fds = self.request("broker", queue=queue, policy=policy, labels=dict(labels or {}))
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("bad-reply", f"broker reply carried {len(fds)} fds, expected the iommufd")
        return fds[0], reply["fault_id"]

    def status(self) -> dict:
        return self.request("status")[0]

    def forward(self, policy: str) -> ForwardSession:
        """Become the peer deciding the groups of the ``forward`` policy ``policy``."""
        self.request("forward", policy=policy)
        return ForwardSession(self)


class ForwardSession:
    """Fault groups arrive as ``fault`` events; answer each with ``respond(event["group"], code)``.
    vEVENTs of the policy's queues arrive as ``vevent`` events, which take no answer."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def events(self) -> Iterator[dict]:
        """Every event message, ``fault`` and ``vevent``, in the order iopfd sent them."""
        while True:
            received = protocol.receive(self.client.sock)
            if received is None:
                return
            message, fds = received
            for fd in fds:
                os.close(fd)
            if message.get("event") in ("fault", "vevent"):
                yield message

    def respond(self, group_id: int, code: str | int) -> None:
        name = code if isinstance(code, str) else protocol.NAMES[code]
        protocol.send(self.client.sock, {"op": "respond", "group": group_id, "code": name})

    def serve(self, decide: Callable[[dict], str | int], *, count: int | None = None,
              on_vevent: Callable[[dict], None] | None = None) -> int:
        """Answer fault events with ``decide(event)`` until the connection ends or ``count`` are
        answered; vEVENTs go to ``on_vevent``, if given."""
        answered = 0
        for event in self.events():
            if event["event"] == "vevent":
                if on_vevent is not None:
                    on_vevent(event)
                continue
            self.respond(event["group"], decide(event))
            answered += 1
            if count is not None and answered >= count:
                break
        return answered
