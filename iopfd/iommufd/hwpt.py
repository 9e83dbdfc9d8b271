"""Hardware page tables: IOMMU_HWPT_ALLOC for nest parents, nested (user-managed) and paging HWPTs."""

from __future__ import annotations

import errno

from iopfd.iommufd.context import Iommufd, Object
from iopfd.iommufd.ioctl import lib, new
from iopfd.uapi_ffi import ffi


class Hwpt(Object):
    @classmethod
    def alloc(cls, ctx: Iommufd, *, dev_id: int, pt_id: int, flags: int = 0,
              data_type: int = 0, data: bytes = b"", fault_id: int | None = None) -> Hwpt:
        """IOMMU_HWPT_ALLOC. ``data`` is the driver's nested page-table description for ``data_type``;
        ``fault_id`` routes this HWPT's I/O page faults to that fault queue."""
        if fault_id is not None:
            flags |= lib.IOMMU_HWPT_FAULT_ID_VALID
        payload = ffi.new("char[]", data) if data else ffi.NULL
        cmd = new("struct iommu_hwpt_alloc", flags=flags, dev_id=dev_id, pt_id=pt_id, data_type=data_type,
                  data_len=len(data), data_uptr=int(ffi.cast("uintptr_t", payload)), fault_id=fault_id or 0)
        hints = {errno.ENOENT: f"dev_id {dev_id}, pt_id {pt_id} or fault_id {fault_id} is not an object of this "
                               "iommufd"}
        if fault_id is not None and flags & lib.IOMMU_HWPT_ALLOC_NEST_PARENT:
            hints[errno.EOPNOTSUPP] = ("a nest parent cannot take a fault queue: pass fault_id to the nested "
                                       "HWPT allocated on top of it")
        elif fault_id is not None and not data:
            hints[errno.EOPNOTSUPP] = ("this kernel delivers faults only from nested HWPTs (faults on paging "
                                       "HWPTs need Linux 6.13+ and driver support): allocate a NEST_PARENT HWPT "
                                       "and a nested HWPT with the fault_id on it")
        elif data:
            hints[errno.EOPNOTSUPP] = (f"the IOMMU driver does not accept data_type {data_type:#x} with flags "
                                       f"{flags:#x}")
            hints[errno.EINVAL] = (f"pt_id {pt_id} must be a HWPT allocated with NEST_PARENT, and the data valid for "
                                   "its driver")
        ctx.ioctl("IOMMU_HWPT_ALLOC", cmd, hints=hints)
        return cls(ctx, cmd.out_hwpt_id)

    @classmethod
    def nest_parent(cls, ctx: Iommufd, *, dev_id: int, ioas_id: int) -> Hwpt:
        """A paging HWPT over an IOAS that nested (stage-1) HWPTs can be built on."""
        return cls.alloc(ctx, dev_id=dev_id, pt_id=ioas_id, flags=lib.IOMMU_HWPT_ALLOC_NEST_PARENT)

    @classmethod
    def nested(cls, ctx: Iommufd, *, dev_id: int, parent_id: int, data_type: int, data: bytes,
               fault_id: int | None = None) -> Hwpt:
        """A user-managed HWPT on ``parent_id``; with ``fault_id`` its faults go to that queue."""
        return cls.alloc(ctx, dev_id=dev_id, pt_id=parent_id, data_type=data_type, data=data, fault_id=fault_id)
