"""A client for iopfd's control socket (docs/protocol.md), for VMM-side code and the tests.

    with Client("/run/iopfd/control.sock") as iopfd:
        iopfd.attach(fault_fd, "vm1", labels={"vm": "guest1"})
        print(iopfd.status())

Blocking and single-threaded, like the C or Rust code it stands in for: each call sends one request
and waits for its reply. ``forward`` returns the peer channel of a forward policy, a ``ForwardChannel``:
fault records arrive as numpy arrays, answers go back as arrays too.

    channel = iopfd.forward("vmm", read_records=256)
    while (records := channel.recv()) is not None:
        channel.respond(channel.group_ids(records), SUCCESS)
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy

from iopfd import protocol
from iopfd.engine.batch import record_dtype
from iopfd.iommufd.context import Closing
from iopfd.iommufd.fault import INVALID, LAST_PAGE, SUCCESS
from iopfd.protocol import ProtocolError

DEFAULT_PATH = "/run/iopfd/control.sock"
CONNECT_POLL = 0.005  # seconds between connect attempts while the daemon's backlog is full
__all__ = ["DEFAULT_PATH", "INVALID", "LAST_PAGE", "SUCCESS", "Client", "ForwardChannel", "ProtocolError"]
RECORD = record_dtype()  # struct iommu_hwpt_pgfault
RESPONSE = numpy.dtype([("cookie", "<u4"), ("code", "<u4")])  # struct iommu_hwpt_page_response
EVENT_HEADER = struct.Struct("<II")  # struct iommufd_vevent_header: flags, sequence
MAX_EVENT_PAYLOAD = 4096  # bytes: more than any vEVENT type's record (arm-smmuv3: 32)


class Client(Closing):
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

    def broker(self, queue: str, *, policy: str | None = None,
               labels: Mapping[str, str] | None = None) -> tuple[int, int]:
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

    def forward(self, policy: str, *, read_records: int = protocol.DEFAULT_READ_RECORDS,
                events: bool = False) -> ForwardChannel:
        """Become the peer deciding the groups of the ``forward`` policy ``policy``: returns the peer
        channel iopfd handed over (with ``events``, its vEVENTs' channel too). This connection stays
        free for other requests; the channel lives until either side closes it."""
        reply, fds = self.request("forward", policy=policy, read_records=read_records, events=events)
        if len(fds) != 1 + events:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("bad-reply", f"forward reply carried {len(fds)} fds, expected {1 + events}")
        return ForwardChannel.from_fds(*fds, read_records=reply["read_records"])


class ForwardChannel(Closing):
    """The peer's end of a forward policy's channel (docs/protocol.md). ``recv()`` returns the records
    of one packet (whole groups, ``cookie`` being iopfd's id for each group); ``respond`` answers groups
    by those ids. ``events``, if opened, is the socket of vEVENTs (``recv_event``)."""

    def __init__(self, sock: socket.socket, *, read_records: int = protocol.DEFAULT_READ_RECORDS,
                 events: socket.socket | None = None) -> None:
        self.sock = sock
        self.read_records = read_records
        self.events = events

    @classmethod
    def from_fds(cls, fd: int, events_fd: int | None = None, *,
                 read_records: int = protocol.DEFAULT_READ_RECORDS) -> ForwardChannel:
        """A channel over inherited or received fds (e.g. the VMM's end of the --forward-fd socketpair)."""
        return cls(socket.socket(fileno=fd), read_records=read_records,
                   events=None if events_fd is None else socket.socket(fileno=events_fd))

    def close(self) -> None:
        self.sock.close()
        if self.events is not None:
            self.events.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, timeout: float | None = None) -> numpy.ndarray | None:
        """The records of the next packet (a structured array, dtype ``RECORD``); None once iopfd has
        closed the channel. ``timeout`` raises TimeoutError when nothing came in time."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(self.read_records * protocol.RECORD_SIZE)
        if not data:
            return None
        return numpy.frombuffer(data, RECORD)

    @staticmethod
    def group_ids(records: numpy.ndarray) -> numpy.ndarray:
        """The id of each group in ``records``, in order (the cookie of its LAST_PAGE record)."""
        return records["cookie"][(records["flags"] & LAST_PAGE) != 0]

    def respond(self, ids: Any, codes: Any) -> None:
        """Answer the groups ``ids`` with ``codes`` (one each, or one for all): SUCCESS (0) or INVALID (1)."""
        responses = numpy.empty(len(ids), RESPONSE)
        responses["cookie"] = ids
        responses["code"] = codes
        for start in range(0, len(responses), protocol.MAX_RESPONSES):
            self.sock.send(responses[start:start + protocol.MAX_RESPONSES].tobytes())

    def serve(self, decide: Callable[[numpy.ndarray], Any], *, count: int | None = None) -> int:
        """Answer every packet's groups with ``decide(records)`` (a code per group, or one for all)
        until iopfd closes the channel or ``count`` groups are answered; returns how many were."""
        answered = 0
        while count is None or answered < count:
            records = self.recv()
            if records is None:
                break
            ids = self.group_ids(records)
            self.respond(ids, decide(records))
            answered += len(ids)
        return answered

    def recv_event(self, timeout: float | None = None) -> tuple[int, int, bytes] | None:
        """The next vEVENT as ``(flags, sequence, payload)``, as a read() of the vEVENTQ returns it
        (flags 1: a LOST_EVENTS header, no payload); None once iopfd has closed the channel."""
        if self.events is None:
            raise ValueError("this channel has no event channel: forward(..., events=True)")
        self.events.settimeout(timeout)
        data = self.events.recv(EVENT_HEADER.size + MAX_EVENT_PAYLOAD)
        if not data:
            return None
        flags, sequence = EVENT_HEADER.unpack_from(data)
        return flags, sequence, data[EVENT_HEADER.size:]
