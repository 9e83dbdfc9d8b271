"""Fault queues: IOMMU_FAULT_QUEUE_ALLOC, then read() fault groups and write() page responses.

read() never blocks and returns whole groups only: every record of a group has the group's cookie
and the last one has LAST_PAGE. A 0-byte read means "nothing pending". write() takes a batch of
responses and stops at the first one the kernel refuses (the group was already answered, e.g. by a
detach): the byte count it returns says how many entries it consumed.
"""

from __future__ import annotations

import errno
import os
import select
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from iopfd._uapi import ffi
from iopfd.iommufd.context import Iommufd, Object
from iopfd.iommufd.errors import IommufdError, error_for
from iopfd.iommufd.uapi import lib, new

RECORD = struct.Struct("<IIIIIIQII")  # struct iommu_hwpt_pgfault, checked against ffi below
RESPONSE = struct.Struct("<II")       # struct iommu_hwpt_page_response
assert RECORD.size == ffi.sizeof("struct iommu_hwpt_pgfault")
assert RESPONSE.size == ffi.sizeof("struct iommu_hwpt_page_response")

PASID_VALID = lib.IOMMU_PGFAULT_FLAGS_PASID_VALID
LAST_PAGE = lib.IOMMU_PGFAULT_FLAGS_LAST_PAGE
# Real hardware can leak kernel-internal flag bits (NEEDS_PASID, bit 2) into records.
KNOWN_FLAGS = PASID_VALID | LAST_PAGE
SUCCESS = lib.IOMMUFD_PAGE_RESP_SUCCESS
INVALID = lib.IOMMUFD_PAGE_RESP_INVALID

ANON_INODE_NAME = "anon_inode:[iommufd-pgfault]"
DEFAULT_BATCH_RECORDS = 256
# A PRI page-request group is bounded by the device's outstanding-request credits; this is far above.
MAX_BUFFER_RECORDS = 1 << 16


@dataclass(frozen=True, slots=True)
class Fault:
    """One page request (one ``struct iommu_hwpt_pgfault``), flags masked to the known bits."""

    flags: int
    dev_id: int
    pasid: int
    grpid: int
    perm: int
    addr: int

    @property
    def pasid_valid(self) -> bool:
        return bool(self.flags & PASID_VALID)


@dataclass(frozen=True, slots=True)
class FaultGroup:
    """A whole page-request group: answered once, by cookie."""

    cookie: int
    faults: tuple[Fault, ...]

    @property
    def dev_id(self) -> int:
        return self.faults[-1].dev_id


class MalformedFaultData(ValueError):
    """The bytes read are not a sequence of whole fault groups."""


def parse_groups(data: memoryview | bytes) -> list[FaultGroup]:
    """Split records read from a fault fd into groups; raise MalformedFaultData if they are not whole."""
    if len(data) % RECORD.size:
        raise MalformedFaultData(f"{len(data)} bytes is not a whole number of {RECORD.size}-byte records")
    groups: list[FaultGroup] = []
    pending: list[Fault] = []
    cookie = None
    for flags, dev_id, pasid, grpid, perm, _reserved, addr, _length, rec_cookie in RECORD.iter_unpack(data):
        if rec_cookie == 0:
            raise MalformedFaultData("record with cookie 0 (the kernel never issues cookie 0)")
        if pending and rec_cookie != cookie:
            raise MalformedFaultData(f"group with cookie {cookie} ends without LAST_PAGE before cookie {rec_cookie}")
        cookie = rec_cookie
        pending.append(Fault(flags & KNOWN_FLAGS, dev_id, pasid, grpid, perm, addr))
        if flags & LAST_PAGE:
            groups.append(FaultGroup(cookie, tuple(pending)))
            pending = []
    if pending:
        raise MalformedFaultData(f"group with cookie {cookie} has no LAST_PAGE record at the end of the read")
    return groups


def describe_fd(fd: int) -> str:
    """What ``/proc/self/fd/N`` says the fd is, e.g. ``anon_inode:[iommufd-pgfault]``."""
    return os.readlink(f"/proc/self/fd/{fd}")


def is_fault_fd(fd: int) -> bool:
    try:
        return describe_fd(fd) == ANON_INODE_NAME
    except OSError:
        return False


class FaultQueue(Object):
    """A fault queue and its fd. Leaving the ``with`` block closes the fd, then destroys the object."""

    def __init__(self, ctx: Iommufd | None, object_id: int, fd: int, *,
                 batch_records: int = DEFAULT_BATCH_RECORDS) -> None:
        super().__init__(ctx, object_id)  # type: ignore[arg-type]
        self.fd = fd
        self._buffer = bytearray(batch_records * RECORD.size)

    @classmethod
    def alloc(cls, ctx: Iommufd, **kwargs) -> FaultQueue:
        cmd = new("struct iommu_fault_alloc")
        ctx.ioctl("IOMMU_FAULT_QUEUE_ALLOC", cmd)
        return cls(ctx, cmd.out_fault_id, cmd.out_fault_fd, **kwargs)

    @classmethod
    def from_fd(cls, fd: int, **kwargs) -> FaultQueue:
        """Adopt a fault fd opened elsewhere (inherited from a VMM, or received over a socket)."""
        if not is_fault_fd(fd):
            try:
                what = describe_fd(fd)
            except OSError:
                what = "not an open file descriptor"
            raise IommufdError(f"adopt fd {fd}", errno.EBADF,
                               f"it is {what}, not an iommufd fault fd ({ANON_INODE_NAME}); pass the "
                               "out_fault_fd of IOMMU_FAULT_QUEUE_ALLOC")
        return cls(None, 0, fd, **kwargs)

    def fileno(self) -> int:
        return self.fd

    @property
    def buffer_records(self) -> int:
        return len(self._buffer) // RECORD.size

    def read_raw(self) -> memoryview:
        """Read as many whole groups as fit in the buffer (growing it when the first group does not
        fit); returns a view of the bytes read, valid until the next read. Empty: nothing pending."""
        while True:
            try:
                n = os.readv(self.fd, [self._buffer])
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # 6.12.101+: the first pending group does not fit
                    self._grow()
                    continue
                raise error_for("read fault fd", exc.errno) from None
            if n == 0 and self._has_input():  # older 6.12: 0 bytes, the group stays queued
                self._grow()
                continue
            return memoryview(self._buffer)[:n]

    def read(self) -> list[FaultGroup]:
        return parse_groups(self.read_raw())

    def _has_input(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return any(event & select.POLLIN for _, event in poller.poll(0))

    def _grow(self) -> None:
        records = self.buffer_records * 2
        if records > MAX_BUFFER_RECORDS:
            raise IommufdError("read fault fd", errno.EMSGSIZE,
                               f"a fault group larger than {MAX_BUFFER_RECORDS} records; refusing to grow further")
        self._buffer = bytearray(records * RECORD.size)

    def respond(self, responses: Iterable[tuple[int, int]]) -> int:
        """Write ``(cookie, code)`` responses in one write(); returns how many the kernel consumed.

        The kernel stops at the first entry it refuses (cookie not pending, or a bad code), so a
        return value short of ``len(responses)`` names the refused entry by index.
        """
        data = b"".join(RESPONSE.pack(cookie, code) for cookie, code in responses)
        return self.write_raw(data)

    def write_raw(self, data: bytes | bytearray | memoryview) -> int:
        try:
            written = os.write(self.fd, data)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # the first entry was refused
                return 0
            raise error_for("write fault fd", exc.errno) from None
        return written // RESPONSE.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self) -> None:
        self.close()  # the object cannot be destroyed while its fd is open
        if self.ctx is not None:
            super().destroy()


def respond_all(queue: FaultQueue, responses: Sequence[tuple[int, int]]) -> list[int]:
    """Write every response, skipping each one the kernel refuses; returns the refused indexes."""
    refused = []
    start = 0
    while start < len(responses):
        consumed = queue.respond(responses[start:])
        start += consumed
        if start < len(responses):
            refused.append(start)
            start += 1
    return refused
