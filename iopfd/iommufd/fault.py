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
from typing import Literal

from iopfd.iommufd.context import FdObject, Iommufd
from iopfd.iommufd.errors import IommufdError, error_from
from iopfd.iommufd.ioctl import lib, new
from iopfd.uapi_ffi import ffi

RECORD = struct.Struct("<IIIIIIQII")  # struct iommu_hwpt_pgfault, checked against ffi below
RESPONSE = struct.Struct("<II")       # struct iommu_hwpt_page_response
assert RECORD.size == ffi.sizeof("struct iommu_hwpt_pgfault")
assert RESPONSE.size == ffi.sizeof("struct iommu_hwpt_page_response")
# Where a record's fields lie, for code that takes one column straight from a read's bytes.
COOKIE_OFFSET = ffi.offsetof("struct iommu_hwpt_pgfault", "cookie")
ADDR_OFFSET = ffi.offsetof("struct iommu_hwpt_pgfault", "addr")

PASID_VALID = lib.IOMMU_PGFAULT_FLAGS_PASID_VALID
LAST_PAGE = lib.IOMMU_PGFAULT_FLAGS_LAST_PAGE
# Real hardware can leak kernel-internal flag bits (NEEDS_PASID, bit 2) into records.
KNOWN_FLAGS = PASID_VALID | LAST_PAGE
SUCCESS = lib.IOMMUFD_PAGE_RESP_SUCCESS
INVALID = lib.IOMMUFD_PAGE_RESP_INVALID
# The response codes by the names the config, the policies' options and the metrics give them.
CodeName = Literal["success", "invalid"]
CODES: dict[CodeName, int] = {"success": SUCCESS, "invalid": INVALID}

# 320 KiB. A decided read costs the engine a fixed few dozen numpy calls (about 7 ms in the TCG lab),
# and the fixed answers of a read a fixed 0.5 ms: reads of 8 192 records rather than 2 048 took
# every policy closer to the C floor (docs/performance.md). The engine reads only when half of
# max_pending is free.
DEFAULT_BATCH_RECORDS = 8192
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


class FaultGroup:
    """A whole page-request group, answered once by cookie. It keeps its records as bytes (one
    object per group, none per record); ``faults`` unpacks them on demand. ``queue`` names the
    fault queue it was read from, for policies that match on it."""

    __slots__ = ("cookie", "records", "queue", "_view")

    def __init__(self, cookie: int, records: bytes, queue: str = "") -> None:
        self.cookie = cookie
        self.records = records
        self.queue = queue
        self._view: memoryview | None = None

    @property
    def _words(self) -> memoryview:
        """10 native-endian u32 per record, as the kernel wrote them; made on first use only, as
        policies like accept never look."""
        if self._view is None:
            self._view = memoryview(self.records).cast("I")
        return self._view

    def __repr__(self) -> str:
        return (f"FaultGroup(cookie={self.cookie}, dev_id={self.dev_id}, faults={self.fault_count}, "
                f"queue={self.queue!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FaultGroup):
            return NotImplemented
        return (self.cookie, self.records, self.queue) == (other.cookie, other.records, other.queue)

    __hash__ = None  # type: ignore[assignment]

    @property
    def fault_count(self) -> int:
        return len(self.records) // RECORD.size

    @property
    def faults(self) -> tuple[Fault, ...]:
        return tuple(Fault(flags & KNOWN_FLAGS, dev_id, pasid, grpid, perm, addr)
                     for flags, dev_id, pasid, grpid, perm, _reserved, addr, _length, _cookie
                     in RECORD.iter_unpack(self.records))

    # The response goes to the device for the (pasid, grpid) of the last record; all records share
    # the device. Fields below read the u32 view directly: policies call them on the hot path.
    @property
    def dev_id(self) -> int:
        return self._words[-9]

    @property
    def pasid_valid(self) -> bool:
        return bool(self._words[-10] & PASID_VALID)

    @property
    def pasid(self) -> int | None:
        """The group's PASID, or None when its records carry none."""
        return self._words[-8] if self._words[-10] & PASID_VALID else None

    @property
    def grpid(self) -> int:
        return self._words[-7]

    @property
    def perm(self) -> int:
        """Every permission any record of the group asks for."""
        perm = 0
        for value in self._words[4::_WORDS].tolist():
            perm |= value
        return perm

    @property
    def addresses(self) -> list[int]:
        words = self._words
        return [words[i] | words[i + 1] << 32 for i in range(6, len(words), _WORDS)]


_WORDS = RECORD.size // 4


class MalformedFaultData(ValueError):
    """The bytes read are not a sequence of whole fault groups."""


def assemble_groups(data: memoryview | bytes, queue: str = "") -> tuple[list[FaultGroup], list[tuple[int, str]]]:
    """Split records read from a fault fd into whole groups, by cookie, each ending at LAST_PAGE.

    Returns the groups and the malformed ones as ``(cookie, reason)``: a run of records that does
    not end at LAST_PAGE or mixes cookies. Their cookies are still pending in the kernel and must be
    answered; cookie 0 (never issued) is reported but cannot be. Works on two u32 columns (flags,
    cookies) of the read, so no Python object is made per record.
    """
    if len(data) % RECORD.size:
        raise MalformedFaultData(f"{len(data)} bytes is not a whole number of {RECORD.size}-byte records")
    view = memoryview(data)
    words = view.cast("B").cast("I")
    flags = words[0::_WORDS].tolist()
    cookies = words[9::_WORDS].tolist()
    groups: list[FaultGroup] = []
    malformed: list[tuple[int, str]] = []
    start = 0
    for index, (flag, cookie) in enumerate(zip(flags, cookies)):
        if not flag & LAST_PAGE:
            continue
        run = cookies[start:index + 1]
        if cookie and run.count(cookie) == len(run):
            groups.append(FaultGroup(cookie, bytes(view[start * RECORD.size:(index + 1) * RECORD.size]), queue))
        else:
            malformed += _malformed_run(run, f"group with cookie {run[0]} ends without LAST_PAGE before "
                                             f"cookie {cookie}" if cookie else "record with cookie 0")
        start = index + 1
    if start < len(cookies):
        malformed += _malformed_run(cookies[start:], f"group with cookie {cookies[start]} has no LAST_PAGE "
                                                     "record at the end of the read")
    seen: dict[int, int] = {}
    for group in groups:
        seen[group.cookie] = seen.get(group.cookie, 0) + 1
    reasons = dict(malformed)  # one entry per cookie: each is answered once
    for cookie, count in seen.items():
        if count > 1:
            reasons.setdefault(cookie, f"cookie {cookie} used by {count} groups of one read")
    if reasons:
        groups = [group for group in groups if group.cookie not in reasons]
    return groups, list(reasons.items())


def _malformed_run(cookies: list[int], reason: str) -> list[tuple[int, str]]:
    if 0 in cookies:
        reason = "record with cookie 0 (the kernel never issues cookie 0)"
    return [(cookie, reason) for cookie in dict.fromkeys(cookies)]


def parse_groups(data: memoryview | bytes, queue: str = "") -> list[FaultGroup]:
    """Strict form of assemble_groups(): raise MalformedFaultData on the first malformed group."""
    groups, malformed = assemble_groups(data, queue)
    if malformed:
        raise MalformedFaultData(malformed[0][1])
    return groups


class FaultQueue(FdObject):
    """A fault queue and its fd. Leaving the ``with`` block closes the fd, then destroys the object."""

    ANON_INODE = "anon_inode:[iommufd-pgfault]"
    DESCRIBED_AS = f"an iommufd fault fd ({ANON_INODE}); pass the out_fault_fd of IOMMU_FAULT_QUEUE_ALLOC"

    def __init__(self, ctx: Iommufd | None, object_id: int, fd: int, *,
                 batch_records: int = DEFAULT_BATCH_RECORDS) -> None:
        super().__init__(ctx, object_id, fd)
        self._buffer = bytearray(batch_records * RECORD.size)

    @classmethod
    def alloc(cls, ctx: Iommufd, **kwargs) -> FaultQueue:
        cmd = new("struct iommu_fault_alloc")
        ctx.ioctl("IOMMU_FAULT_QUEUE_ALLOC", cmd)
        return cls(ctx, cmd.out_fault_id, cmd.out_fault_fd, **kwargs)

    @property
    def buffer_records(self) -> int:
        return len(self._buffer) // RECORD.size

    def read_raw(self, *, confirm_empty: bool = True, into: memoryview | None = None) -> memoryview:
        """Read as many whole groups as fit in the buffer (growing it when the first group does not
        fit); returns a view of the bytes read, valid until the next read. Empty: nothing pending.
        ``into``: a writable byte buffer of the caller's to read into instead, if it is as large.

        Kernels before 6.12.101 return 0 bytes, not EINVAL, when the first group does not fit; only
        poll() tells that apart from an empty queue. ``confirm_empty=False`` skips that poll() when
        the caller knows the queue was just drained (it read groups a moment ago).
        """
        while True:
            buffer = into if into is not None and len(into) >= len(self._buffer) else self._buffer
            try:
                n = self._readinto(buffer)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # 6.12.101+: the first pending group does not fit
                    self._grow()
                    continue
                raise error_from("read fault fd", exc) from None
            if n == 0 and confirm_empty and self._has_input():
                self._grow()
                continue
            return memoryview(buffer)[:n]

    def read(self) -> list[FaultGroup]:
        return parse_groups(self.read_raw())

    # The three system calls, apart so the emulated queue can stand in for the kernel.
    def _readinto(self, buffer: bytearray | memoryview) -> int:
        return os.readv(self.fd, [buffer])

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        return os.write(self.fd, data)

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
        flat = [value for response in responses for value in response]
        return self.write_raw(struct.pack(f"<{len(flat)}I", *flat))

    def write_raw(self, data: bytes | bytearray | memoryview) -> int:
        try:
            written = self._write(data)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # the first entry was refused
                return 0
            raise error_from("write fault fd", exc) from None
        return written // RESPONSE.size



def respond_all(queue: FaultQueue, responses: Sequence[tuple[int, int]]) -> list[int]:
    """Write every ``(cookie, code)`` response, skipping each one the kernel refuses; returns the
    refused indexes."""
    flat = [value for response in responses for value in response]
    return respond_packed(queue, struct.pack(f"<{len(flat)}I", *flat))


def respond_packed(queue: FaultQueue, payload: bytes | bytearray | memoryview) -> list[int]:
    """respond_all() for responses already packed as ``struct iommu_hwpt_page_response``s."""
    view = memoryview(payload)
    total = len(view) // RESPONSE.size
    refused = []
    start = 0
    while start < total:
        start += queue.write_raw(view[start * RESPONSE.size:])
        if start < total:
            refused.append(start)
            start += 1
    return refused
