"""IO address spaces: IOMMU_IOAS_ALLOC, _MAP, _UNMAP, _IOVA_RANGES."""

from __future__ import annotations

import errno

from iopfd.iommufd.context import Iommufd, Object
from iopfd.iommufd.ioctl import lib, new
from iopfd.uapi_ffi import ffi

U64_MAX = 2**64 - 1


class Ioas(Object):
    ctx: Iommufd  # where the IOAS lives
    @classmethod
    def alloc(cls, ctx: Iommufd) -> Ioas:
        cmd = new("struct iommu_ioas_alloc")
        ctx.ioctl("IOMMU_IOAS_ALLOC", cmd)
        return cls(ctx, cmd.out_ioas_id)

    def map(self, user_va: int, length: int, iova: int | None = None, *,
            readable: bool = True, writeable: bool = True) -> int:
        """Map ``length`` bytes of this process's memory at ``user_va``; returns the IOVA used.

        With ``iova`` the mapping is placed there (FIXED_IOVA), else the kernel picks one.
        """
        flags = (lib.IOMMU_IOAS_MAP_READABLE if readable else 0) | (lib.IOMMU_IOAS_MAP_WRITEABLE if writeable else 0)
        if iova is not None:
            flags |= lib.IOMMU_IOAS_MAP_FIXED_IOVA
        cmd = new("struct iommu_ioas_map", flags=flags, ioas_id=self.id, user_va=user_va,
                  length=length, iova=iova or 0)
        self.ctx.ioctl("IOMMU_IOAS_MAP", cmd, hints={
            errno.EINVAL: "user_va, length and iova must be aligned to the IOAS's iova alignment",
            errno.EEXIST: "that IOVA range is already mapped",
            errno.ENOSPC: "no free IOVA range of that length is allowed",
        })
        return cmd.iova

    def unmap(self, iova: int = 0, length: int = U64_MAX) -> int:
        """Unmap a range that covers whole earlier mappings; the default unmaps everything. Returns bytes unmapped."""
        cmd = new("struct iommu_ioas_unmap", ioas_id=self.id, iova=iova, length=length)
        self.ctx.ioctl("IOMMU_IOAS_UNMAP", cmd, hints={
            errno.ENOENT: "nothing is mapped in that range",
            errno.EINVAL: "the range must cover whole mappings made with IOMMU_IOAS_MAP",
        })
        return cmd.length

    def iova_ranges(self) -> tuple[list[tuple[int, int]], int]:
        """The allowed IOVA ranges as inclusive ``(start, last)`` pairs, and the IOVA alignment."""
        capacity = 8
        while True:
            ranges = ffi.new("struct iommu_iova_range[]", capacity)
            cmd = new("struct iommu_ioas_iova_ranges", ioas_id=self.id, num_iovas=capacity,
                      allowed_iovas=int(ffi.cast("uintptr_t", ranges)))
            try:
                self.ctx.ioctl("IOMMU_IOAS_IOVA_RANGES", cmd)
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                capacity = cmd.num_iovas  # the kernel says how many it has
                continue
            found = [(ranges[i].start, ranges[i].last) for i in range(cmd.num_iovas)]
            return found, cmd.out_iova_alignment
