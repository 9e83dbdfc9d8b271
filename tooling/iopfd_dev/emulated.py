"""An in-process fault queue with the 6.12.117 kernel's semantics, for unit tests and benchmarks.

It models iommufd's fault object, not hardware: page requests are reported one by one (held as
partials until the LAST_PAGE request of their grpid completes the group), read() hands out whole
groups with the lowest free cookie, write() consumes responses until the first one it refuses, and
a detach answers INVALID everything of that device. ``fileno()`` is an eventfd that polls readable
exactly while undelivered groups exist, like the fault fd. tests/kernel/test_emulated_differential.py
runs the same scenarios against this and the lab kernel and requires identical results.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import deque
from dataclasses import dataclass

from iopfd.iommufd.fault import INVALID, LAST_PAGE, PASID_VALID, RECORD, RESPONSE, SUCCESS, FaultQueue

MAX_COOKIE = 0xFFFFFFFF


@dataclass(frozen=True)
class PageRequest:
    dev_id: int
    addr: int
    pasid: int = 0
    grpid: int = 0
    perm: int = 0
    last: bool = True

    def record(self, cookie: int) -> bytes:
        flags = (LAST_PAGE if self.last else 0) | (PASID_VALID if self.pasid else 0)
        return RECORD.pack(flags, self.dev_id, self.pasid, self.grpid, self.perm, 0, self.addr, 0, cookie)


class EmulatedFaultQueue:
    """The kernel side (``report``, ``detach``) and the fd side (``read``, ``write``, ``fileno``)."""

    def __init__(self) -> None:
        self._partials: list[PageRequest] = []
        self._deliver: deque[tuple[PageRequest, ...]] = deque()
        self._pending: dict[int, tuple[PageRequest, ...]] = {}
        self._free_below = 1  # every cookie below this is in use: where the lowest-free search starts
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.answers: list[tuple[tuple[PageRequest, ...], int]] = []  # (group, code), user or automatic

    # -- kernel side -------------------------------------------------------------------------
    def report(self, request: PageRequest) -> None:
        """iommu_report_device_fault(): a partial waits for its group's LAST_PAGE request."""
        if not request.last:
            self._partials.append(request)
            return
        group = (*(p for p in self._partials if p.grpid == request.grpid), request)
        self._partials = [p for p in self._partials if p.grpid != request.grpid]
        self._deliver.append(group)
        self._update_readiness()

    def detach(self, dev_id: int) -> None:
        """Detach/replace away: every group of ``dev_id``, undelivered or read, is answered INVALID."""
        for group in [g for g in self._deliver if g[-1].dev_id == dev_id]:
            self._deliver.remove(group)
            self.answers.append((group, INVALID))
        for cookie in [c for c, g in self._pending.items() if g[-1].dev_id == dev_id]:
            self._release(cookie, INVALID)
        self._update_readiness()

    # -- fd side -----------------------------------------------------------------------------
    def open(self, **kwargs) -> EmulatedFaultFd:
        """A FaultQueue reading and writing this emulation, as the daemon's engine uses one."""
        return EmulatedFaultFd(self, **kwargs)

    def fileno(self) -> int:
        return self._eventfd

    def read(self, count: int) -> bytes:
        """read(fd, count): whole groups that fit; EINVAL when the first does not; b"" when empty."""
        if count % RECORD.size:
            raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
        out = bytearray()
        while self._deliver:
            group = self._deliver[0]
            if len(out) + len(group) * RECORD.size > count:
                if not out:
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                break
            self._deliver.popleft()
            cookie = self._allocate_cookie()
            self._pending[cookie] = group
            out += b"".join(request.record(cookie) for request in group)
        self._update_readiness()
        return bytes(out)

    def write(self, data: bytes) -> int:
        """write(fd, data): responses in order until the first refused; EINVAL if that is the first."""
        if len(data) % RESPONSE.size:
            raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
        consumed = 0
        for cookie, code in RESPONSE.iter_unpack(data):
            if code not in (SUCCESS, INVALID) or cookie not in self._pending:
                break
            self._release(cookie, code)
            consumed += RESPONSE.size
        if consumed == 0 and data:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return consumed

    def close(self) -> None:
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1

    @property
    def undelivered(self) -> int:
        return len(self._deliver)

    @property
    def pending_cookies(self) -> list[int]:
        return sorted(self._pending)

    # -- internals ---------------------------------------------------------------------------
    def _allocate_cookie(self) -> int:
        cookie = self._free_below
        while cookie in self._pending:
            cookie += 1
        if cookie > MAX_COOKIE:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        self._free_below = cookie + 1
        return cookie

    def _release(self, cookie: int, code: int) -> None:
        self.answers.append((self._pending.pop(cookie), code))
        self._free_below = min(self._free_below, cookie)

    def _update_readiness(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)  # clear
        if self._deliver:
            os.eventfd_write(self._eventfd, 1)


class EmulatedFaultFd(FaultQueue):
    """FaultQueue over an EmulatedFaultQueue: its buffer growth and response batching run unchanged;
    only the three system calls go to the emulation."""

    def __init__(self, emulated: EmulatedFaultQueue, **kwargs) -> None:
        super().__init__(None, 0, emulated.fileno(), **kwargs)
        self.emulated = emulated

    def _readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.emulated.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        return self.emulated.write(bytes(data))

    def _has_input(self) -> bool:
        return self.emulated.undelivered > 0

    def close(self) -> None:
        self.fd = -1  # the eventfd belongs to the emulated queue
