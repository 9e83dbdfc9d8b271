"""vIOMMUs, vDEVICEs and vEVENTQs (Linux 6.15+): IOMMU_VIOMMU_ALLOC, IOMMU_VDEVICE_ALLOC,
IOMMU_VEVENTQ_ALLOC, then read() events from the vEVENTQ fd.

A vEVENTQ delivers events the IOMMU reports for devices behind a vIOMMU (for the guest's vIOMMU to
raise); nothing is answered. Each event is an 8-byte ``struct iommufd_vevent_header`` (flags,
sequence) and a payload whose size the queue's type fixes. Every event, a dropped one included,
takes the queue's next sequence number, 0 first, wrapping from INT_MAX to 0. When the queue is full
the kernel drops the event and moves one payload-less LOST_EVENTS header, carrying the dropped
event's sequence, to the tail; the next event that fits removes that header again if it is still
last, so a gap in the sequence is the only trace of those drops.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from iopfd.iommufd.context import FdObject, Iommufd, Object
from iopfd.iommufd.errors import IommufdError, error_from
from iopfd.iommufd.ioctl import lib, new
from iopfd.uapi_ffi import ffi

HEADER = struct.Struct("<II")  # struct iommufd_vevent_header
assert HEADER.size == ffi.sizeof("struct iommufd_vevent_header")
LOST_EVENTS = lib.IOMMU_VEVENTQ_FLAG_LOST_EVENTS
SEQUENCE_MASK = 0x7FFFFFFF  # INT_MAX: the kernel's sequence wraps from it to 0

SELFTEST = lib.IOMMU_VEVENTQ_TYPE_SELFTEST
ARM_SMMUV3 = lib.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3
# Payload bytes per type: struct iommu_viommu_event_selftest (u32 virt_id) and struct
# iommu_vevent_arm_smmuv3 (four little-endian u64: the 256-bit SMMUv3 event record).
PAYLOAD_SIZES = {SELFTEST: ffi.sizeof("struct iommu_viommu_event_selftest"), ARM_SMMUV3: 32}
# Low-cardinality names for logs, metrics and the control protocol.
TYPE_NAMES = {SELFTEST: "selftest", ARM_SMMUV3: "arm-smmuv3"}
TYPES = {name: value for value, name in TYPE_NAMES.items()}

DEFAULT_BATCH_EVENTS = 256
MAX_DEPTH = 1 << 19  # the kernel's VEVENTQ_MAX_DEPTH


class Viommu(Object):
    @classmethod
    def alloc(cls, ctx: Iommufd, *, dev_id: int, hwpt_id: int, viommu_type: int, data: bytes = b"") -> Viommu:
        """IOMMU_VIOMMU_ALLOC: a vIOMMU of ``viommu_type`` for ``dev_id``'s IOMMU on the nest parent
        ``hwpt_id``. Nested HWPTs allocated with pt_id = its ID belong to it."""
        payload = ffi.new("char[]", data) if data else ffi.NULL
        cmd = new("struct iommu_viommu_alloc", type=viommu_type, dev_id=dev_id, hwpt_id=hwpt_id,
                  data_len=len(data), data_uptr=int(ffi.cast("uintptr_t", payload)))
        ctx.ioctl("IOMMU_VIOMMU_ALLOC", cmd, hints={
            errno.EOPNOTSUPP: f"the IOMMU driver of dev_id {dev_id} offers no vIOMMU of type {viommu_type:#x} "
                              "(type 0, DEFAULT, is reserved); the mock IOMMU's is IOMMU_VIOMMU_TYPE_SELFTEST",
            errno.EINVAL: f"hwpt_id {hwpt_id} must be a paging HWPT allocated with IOMMU_HWPT_ALLOC_NEST_PARENT",
            errno.ENOENT: f"dev_id {dev_id} or hwpt_id {hwpt_id} is not an object of this iommufd",
        })
        return cls(ctx, cmd.out_viommu_id)


class Vdevice(Object):
    @classmethod
    def alloc(cls, ctx: Iommufd, *, viommu_id: int, dev_id: int, virt_id: int) -> Vdevice:
        """IOMMU_VDEVICE_ALLOC: ``dev_id`` as the guest sees it behind the vIOMMU (``virt_id``: its
        virtual stream/device ID). A device needs one before it attaches to the vIOMMU's nested HWPTs."""
        cmd = new("struct iommu_vdevice_alloc", viommu_id=viommu_id, dev_id=dev_id, virt_id=virt_id)
        ctx.ioctl("IOMMU_VDEVICE_ALLOC", cmd, hints={
            errno.EEXIST: f"dev_id {dev_id} already has a vDEVICE, or virt_id {virt_id:#x} is taken on vIOMMU "
                          f"{viommu_id}; destroy that vDEVICE first",
            errno.EINVAL: f"dev_id {dev_id} is not behind the IOMMU of vIOMMU {viommu_id}, or virt_id is too large",
            errno.ENOENT: f"viommu_id {viommu_id} or dev_id {dev_id} is not an object of this iommufd",
        })
        return cls(ctx, cmd.out_vdevice_id)


@dataclass(frozen=True, slots=True)
class VeventRecord:
    """One record read from a vEVENTQ: a header and its payload (empty for a LOST_EVENTS header)."""

    flags: int
    sequence: int
    data: bytes

    @property
    def lost_events(self) -> bool:
        return bool(self.flags & LOST_EVENTS)


class MalformedVevents(ValueError):
    """The bytes read are not whole events of the queue's type."""


def parse_vevents(data: memoryview | bytes, payload_size: int) -> list[VeventRecord]:
    """Split what one read() returned into records: a header, then ``payload_size`` bytes unless the
    header has LOST_EVENTS."""
    view = memoryview(data)
    records = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < HEADER.size:
            raise MalformedVevents(f"{len(view) - offset} bytes at offset {offset}: less than a header")
        flags, sequence = HEADER.unpack_from(view, offset)
        offset += HEADER.size
        size = 0 if flags & LOST_EVENTS else payload_size
        if len(view) - offset < size:
            raise MalformedVevents(f"event {sequence} at offset {offset - HEADER.size}: its {size}-byte payload "
                                   "is cut short")
        records.append(VeventRecord(flags, sequence, bytes(view[offset:offset + size])))
        offset += size
    return records


class SequenceTracker:
    """Counts the events the kernel dropped, from the sequence numbers of the records read.

    A LOST_EVENTS header with sequence s after sequence p stands for s - p dropped events (itself one
    of them); a real event with sequence s after p means s - p - 1 were dropped. Arithmetic is modulo
    2^31 (the wrap at INT_MAX). A new queue's first event is sequence 0: as if -1 came before it.
    """

    def __init__(self, last: int = SEQUENCE_MASK) -> None:
        self.last = last  # SEQUENCE_MASK is -1 modulo 2^31

    def lost_before(self, record: VeventRecord) -> int:
        """How many events the kernel dropped between the last record and this one (for a LOST_EVENTS
        header, up to and including it)."""
        gap = (record.sequence - self.last) & SEQUENCE_MASK
        self.last = record.sequence
        return gap if record.lost_events else (gap - 1) & SEQUENCE_MASK


class VeventQueue(FdObject):
    """A vEVENTQ and its fd. Leaving the ``with`` block closes the fd, then destroys the object. An
    adopted fd does not say its type: ``adopt(fd, event_type)``."""

    ANON_INODE = "anon_inode:[iommufd-viommu-event]"
    DESCRIBED_AS = f"a vEVENTQ fd ({ANON_INODE}); pass the out_veventq_fd of IOMMU_VEVENTQ_ALLOC"

    def __init__(self, ctx: Iommufd | None, object_id: int, fd: int, event_type: int, *,
                 batch_events: int = DEFAULT_BATCH_EVENTS) -> None:
        super().__init__(ctx, object_id, fd)
        if event_type not in PAYLOAD_SIZES:
            raise IommufdError("read vEVENTQ", errno.EOPNOTSUPP,
                               f"iopfd does not know the event size of vEVENTQ type {event_type:#x}; it knows "
                               f"{', '.join(f'{name} ({value:#x})' for value, name in TYPE_NAMES.items())}")
        self.type = event_type
        self.type_name = TYPE_NAMES[event_type]
        self.payload_size = PAYLOAD_SIZES[event_type]
        # Every record is at most a header and a payload, so the first always fits: the kernel's
        # "first event does not fit" EINVAL then means the type given is wrong.
        self._buffer = bytearray(batch_events * (HEADER.size + self.payload_size))

    @classmethod
    def alloc(cls, ctx: Iommufd, *, viommu_id: int, event_type: int, depth: int, **kwargs) -> VeventQueue:
        """IOMMU_VEVENTQ_ALLOC: at most ``depth`` undelivered events of ``event_type`` from the vIOMMU."""
        cmd = new("struct iommu_veventq_alloc", viommu_id=viommu_id, type=event_type, veventq_depth=depth)
        ctx.ioctl("IOMMU_VEVENTQ_ALLOC", cmd, hints={
            errno.EOPNOTSUPP: f"type {event_type:#x} is not a vEVENTQ type (0, DEFAULT, is reserved); pass the "
                              "vIOMMU driver's, e.g. IOMMU_VEVENTQ_TYPE_SELFTEST for the mock IOMMU",
            errno.EINVAL: f"depth {depth} is outside 1..{MAX_DEPTH}",
            errno.EEXIST: f"vIOMMU {viommu_id} already has a vEVENTQ of type {event_type:#x}; one per type: "
                          "read that one, or destroy it first",
            errno.ENOENT: f"viommu_id {viommu_id} is not a vIOMMU of this iommufd",
        })
        return cls(ctx, cmd.out_veventq_id, cmd.out_veventq_fd, event_type, **kwargs)

    def read_raw(self) -> memoryview:
        """Read as many whole events as fit in the buffer; a view of the bytes, valid until the next
        read. Empty: nothing pending."""
        try:
            n = os.readv(self.fd, [self._buffer])
        except OSError as exc:
            raise error_from("read vEVENTQ", exc, {errno.EINVAL: (
                f"an event is larger than a {self.type_name} event ({self.payload_size} bytes of payload): is "
                "the vEVENTQ's type the one given?")}) from None
        return memoryview(self._buffer)[:n]

    def read(self) -> list[VeventRecord]:
        return parse_vevents(self.read_raw(), self.payload_size)

