"""``ioas-map``: demand paging for a user-space driver's IOAS (faults on paging HWPTs, Linux 6.13+).

A fault inside the configured IOVA window is served by mapping its page, ``[addr & ~(page_size-1),
+page_size)``, from the same offset of a backing file region into the IOAS with IOMMU_IOAS_MAP
(FIXED_IOVA), then answering SUCCESS so the device retries; a fault outside the window is answered
INVALID. A page already mapped (EEXIST: an earlier fault of the same page) counts as mapped.

The IOAS ID names an IOAS of the queue's iommufd, so the policy needs that iommufd: the daemon
passes it in ``bind`` for queues it brokered (it opened the iommufd and handed it to the peer,
which builds its IOAS and HWPTs in it). A queue attached as a bare fault fd cannot be served.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from typing import Annotated, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from iopfd.engine.batch import Batch, np
from iopfd.engine.policy import BatchPolicy, Policy
from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.fault import INVALID, SUCCESS
from iopfd.iommufd.ioas import Ioas
from iopfd.uapi_ffi import ffi

log = structlog.get_logger("iopfd.policies.ioas_map")

U64 = Annotated[int, Field(ge=0, lt=1 << 64)]


class IoasMapOptions(BaseModel):
    """The window ``[iova, iova + length)`` is backed by ``[backing_offset, backing_offset + length)`` of
    the file ``backing`` (a memfd is named ``/proc/PID/fd/N``)."""

    model_config = ConfigDict(extra="forbid")

    ioas_id: Annotated[int, Field(ge=1, le=0xFFFFFFFF)]
    iova: U64
    length: Annotated[int, Field(gt=0, lt=1 << 64)]
    backing: str = Field(min_length=1)
    backing_offset: U64 = 0
    # What one fault maps: a power of two, a multiple of the IOAS's IOVA alignment (the kernel checks
    # that: 2048 for the selftest mock's domain, the CPU page size for real IOMMU drivers).
    page_size: Annotated[int, Field(ge=512, le=1 << 30)] = 4096
    readable: bool = True
    writeable: bool = True

    @model_validator(mode="after")
    def _aligned(self) -> IoasMapOptions:
        size = self.page_size
        if size & (size - 1):
            raise ValueError(f"page_size {size} is not a power of two")
        for key in ("iova", "length", "backing_offset"):
            value = getattr(self, key)
            if value % size:
                raise ValueError(f"{key} {value:#x} is not a multiple of page_size {size:#x}; "
                                 f"round it to {value - value % size:#x} or {value - value % size + size:#x}")
        if self.iova + self.length > 1 << 64:
            raise ValueError(f"the window [{self.iova:#x}, +{self.length:#x}) runs past the 64-bit IOVA space")
        if not (self.readable or self.writeable):
            raise ValueError("readable and writeable are both false; a mapping needs at least one")
        return self


class IoasMapPolicy(BatchPolicy):
    Options = IoasMapOptions

    def __init__(self, name: str, options: IoasMapOptions) -> None:
        self.name = name
        self.options = options
        self.window_end = options.iova + options.length
        # Kept for the life of the policy: the IOAS mappings made from it pin its pages.
        self._region, self._base = _map_backing(options)  # _base: user VA of the window's first byte
        self._iommufds: dict[str, Iommufd] = {}  # queue -> its iommufd, where the IOAS lives
        self.counts = {"mapped": 0, "already_mapped": 0, "outside_window": 0}

    @classmethod
    def from_config(cls, name: str, options: IoasMapOptions, lookup: Callable[[str, str], Policy]) -> IoasMapPolicy:
        """Built by the daemon: refuse a kernel that cannot deliver faults from paging HWPTs, where
        nothing this policy maps would ever be asked for (nested HWPTs fault on guest addresses)."""
        _check_kernel(name)
        return cls(name, options)

    def bind(self, queue: str, iommufd: Iommufd | None) -> None:
        if iommufd is None:
            raise ValueError(f"policy {self.name!r} (ioas-map) maps into IOAS {self.options.ioas_id} of the queue's "
                             f"iommufd, and iopfd holds the iommufd only of queues it brokered; ask for queue "
                             f"{queue!r} with the control socket's broker op")
        self._iommufds[queue] = iommufd

    def unbind(self, queue: str) -> None:
        self._iommufds.pop(queue, None)

    def page_of(self, addr: int) -> int | None:
        """The IOVA of the page that serves a fault at ``addr``, or None when it lies outside the window."""
        page = addr & ~(self.options.page_size - 1)
        return page if self.options.iova <= page < self.window_end else None

    def user_va_of(self, page: int) -> int:
        """Where the page's bytes are in this process: the backing at the same offset into the window."""
        return self._base + (page - self.options.iova)

    def decide_batch(self, batch: Batch) -> Any:
        """Map every page the batch faults on inside the window, coalesced into ranges of consecutive
        pages with one IOMMU_IOAS_MAP each; SUCCESS for groups whose pages are all mapped."""
        n = np()
        size = self.options.page_size
        records = batch.records()
        counts = batch.fault_count
        starts = n.cumsum(counts) - counts
        pages = records["addr"] & n.uint64(~(size - 1) & 0xFFFFFFFFFFFFFFFF)
        inside = (pages >= n.uint64(self.options.iova)) & (pages < n.uint64(min(self.window_end, (1 << 64) - 1)))
        served = n.logical_and.reduceat(inside, starts) if len(batch) else inside[:0]
        codes = n.where(served, SUCCESS, INVALID).astype(n.uint32)
        if not served.all():
            outside = n.flatnonzero(~served)
            self.counts["outside_window"] += len(outside)
            log.warning("faults outside the ioas-map window; answered INVALID", policy=self.name, queue=batch.queue,
                        groups=len(outside), dev_ids=sorted(set(batch.dev_id[outside].tolist()))[:8],
                        addresses=[hex(a) for a in records["addr"][~inside][:8].tolist()],
                        window=f"[{self.options.iova:#x}, {self.window_end:#x})")
        wanted = n.unique(pages[n.repeat(served, counts)])
        if not len(wanted):
            return codes
        iommufd = self._iommufds.get(batch.queue)
        if iommufd is None:  # bind() refuses such queues; a group from one means a caller skipped it
            raise RuntimeError(f"policy {self.name!r} is not bound to queue {batch.queue!r}")
        ioas = Ioas(iommufd, self.options.ioas_id)
        breaks = n.flatnonzero(n.diff(wanted) != size) + 1
        failed = [run for run in n.split(wanted, breaks) if not self._map_run(ioas, int(run[0]), len(run))]
        if failed:
            lost = n.isin(pages, n.concatenate(failed))
            codes[n.logical_or.reduceat(lost, starts) & served] = INVALID
        return codes

    def _map_run(self, ioas: Ioas, first_page: int, pages: int) -> bool:
        """Map ``pages`` consecutive pages in one IOMMU_IOAS_MAP; where some are mapped already (EEXIST),
        page by page. False if the kernel refused for another reason (logged)."""
        size = self.options.page_size
        try:
            ioas.map(self.user_va_of(first_page), pages * size, first_page,
                     readable=self.options.readable, writeable=self.options.writeable)
        except IommufdError as exc:
            if exc.errno != errno.EEXIST:
                log.error("cannot map faulting pages; their groups answered INVALID", policy=self.name,
                          iova=hex(first_page), pages=pages, error=str(exc))
                return False
            if pages == 1:
                self.counts["already_mapped"] += 1
                return True
            return all([self._map_run(ioas, first_page + i * size, 1) for i in range(pages)])
        self.counts["mapped"] += pages
        return True


def _map_backing(options: IoasMapOptions) -> tuple[mmap.mmap, int]:
    """mmap the backing region once (MAP_SHARED: device writes land in the file); returns the mapping
    and the user VA of the window's first byte in it."""
    flags = os.O_RDWR if options.writeable else os.O_RDONLY
    try:
        fd = os.open(options.backing, flags | os.O_CLOEXEC)
    except OSError as exc:
        writable = "-writable" if options.writeable else ""
        raise ValueError(f"backing {options.backing}: {exc.strerror}; give a readable{writable} "
                         "file (a memfd as /proc/PID/fd/N)") from None
    try:
        size = os.fstat(fd).st_size
        end = options.backing_offset + options.length
        if size < end:
            raise ValueError(f"backing {options.backing} has {size:#x} bytes; the window needs "
                             f"[{options.backing_offset:#x}, {end:#x}): make the file at least {end:#x} bytes or "
                             "shorten length")
        start = options.backing_offset - options.backing_offset % mmap.ALLOCATIONGRANULARITY
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if options.writeable else 0)
        region = mmap.mmap(fd, end - start, mmap.MAP_SHARED, prot, offset=start)
    finally:
        os.close(fd)
    address = int(ffi.cast("uintptr_t", ffi.from_buffer(region)))
    return region, address + options.backing_offset - start


def _check_kernel(name: str) -> None:
    # Imported only here: probing imports the selftest helpers.
    from iopfd.iommufd.probe import NO, PAGING_HWPT_FAULTS, YES, probe

    (feature,) = [f for f in probe() if f.name == PAGING_HWPT_FAULTS]
    if feature.status == NO:
        raise ValueError(f"this kernel does not deliver faults from paging HWPTs (iopfd probe: {feature.detail}); "
                         "ioas-map needs Linux 6.13+ with an IOMMU driver that supports them")
    if feature.status != YES:
        log.warning("cannot tell whether this kernel delivers faults from paging HWPTs; ioas-map needs Linux 6.13+",
                    policy=name, probe=feature.detail)
