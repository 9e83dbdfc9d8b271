"""The kernel's mock IOMMU (CONFIG_IOMMUFD_TEST): mock devices, replace, and injected page faults.

Used by the kernel lab and the demo to drive the real iommufd fault path without hardware.
"""

from __future__ import annotations

import errno
import struct

from iopfd.iommufd.context import Iommufd, Object
from iopfd.iommufd.hwpt import Hwpt
from iopfd.iommufd.ioas import Ioas
from iopfd._uapi import ffi
from iopfd.iommufd.uapi import lib, new

NO_SELFTEST = ("the kernel lacks CONFIG_IOMMUFD_TEST (the selftest mock IOMMU); "
               "run inside the kernel lab (iopfd lab run ...)")
NO_IOPF = ("the kernel lacks IOMMU_IOPF, so no device can attach to a fault-capable HWPT; "
           "enable INTEL_IOMMU_SVM or AMD_IOMMU in its config")
SELFTEST_NESTED_DATA = struct.pack("<I", lib.IOMMU_TEST_IOTLB_DEFAULT)  # struct iommu_hwpt_selftest


def build_test_cmd(op: int, object_id: int = 0, **members):
    """A ``struct iommu_test_cmd``: ``members`` maps a union member name to a dict of its fields."""
    cmd = new("struct iommu_test_cmd", op=op, id=object_id)
    for member, fields in members.items():
        for name, value in fields.items():
            setattr(getattr(cmd, member), name, value)
    return cmd


def selftest_cmd(ctx: Iommufd, op: int, object_id: int = 0, hints=None, **members):
    """IOMMU_TEST_CMD with build_test_cmd(op, object_id, **members), returned with the kernel's outputs."""
    cmd = build_test_cmd(op, object_id, **members)
    ctx.ioctl("IOMMU_TEST_CMD", cmd, hints={errno.ENOTTY: NO_SELFTEST, **(hints or {})})
    return cmd


class MockDevice(Object):
    """A mock device, bound to the iommufd and attached to ``pt_id`` at creation.

    ``id`` is the selftest device (stdev) ID used for replace and destroy; ``dev_id`` is the
    iommufd device (idev) ID used in HWPT_ALLOC, TRIGGER_IOPF and fault records.
    """

    def __init__(self, ctx: Iommufd, stdev_id: int, dev_id: int, hwpt_id: int) -> None:
        super().__init__(ctx, stdev_id)
        self.dev_id = dev_id
        self.hwpt_id = hwpt_id

    @classmethod
    def create(cls, ctx: Iommufd, pt_id: int, *, flags: int = 0) -> MockDevice:
        """IOMMU_TEST_OP_MOCK_DOMAIN(_FLAGS) on an IOAS (gets an automatic paging domain) or a HWPT."""
        if flags:
            cmd = selftest_cmd(ctx, lib.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, pt_id, mock_domain_flags={"dev_flags": flags})
            out = cmd.mock_domain_flags
        else:
            out = selftest_cmd(ctx, lib.IOMMU_TEST_OP_MOCK_DOMAIN, pt_id).mock_domain
        return cls(ctx, out.out_stdev_id, out.out_idev_id, out.out_hwpt_id)

    def replace(self, pt_id: int) -> int:
        """Attach to ``pt_id`` in place of the current HWPT; returns the HWPT now attached.

        Replacing away from a fault-capable HWPT answers its pending groups INVALID.
        """
        cmd = selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, self.id,
                       mock_domain_replace={"pt_id": pt_id}, hints={errno.ENODEV: NO_IOPF})
        self.hwpt_id = cmd.mock_domain_replace.pt_id
        return self.hwpt_id

    def trigger_iopf(self, *, addr: int, pasid: int = 0, grpid: int = 0,
                     perm: int = lib.IOMMU_PGFAULT_PERM_READ) -> None:
        """Inject one single-record page-request group (LAST_PAGE; PASID_VALID if pasid != 0).

        The kernel returns success even when nothing takes the fault (it is answered INVALID inside).
        """
        selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_TRIGGER_IOPF,
                     trigger_iopf=self._trigger_fields(addr, pasid, grpid, perm))

    def trigger_iopf_ioctl(self, *, addr: int, pasid: int = 0, grpid: int = 0,
                           perm: int = lib.IOMMU_PGFAULT_PERM_READ) -> tuple[int, bytes]:
        """The ioctl request number and argument bytes of trigger_iopf(), for a program that issues it
        many times on this device's iommufd (the bench's C trigger) without knowing the struct."""
        cmd = build_test_cmd(lib.IOMMU_TEST_OP_TRIGGER_IOPF, trigger_iopf=self._trigger_fields(addr, pasid, grpid, perm))
        return lib.IOMMU_TEST_CMD, bytes(ffi.buffer(cmd))

    def _trigger_fields(self, addr: int, pasid: int, grpid: int, perm: int) -> dict[str, int]:
        return {"dev_id": self.dev_id, "pasid": pasid, "grpid": grpid, "perm": perm, "addr": addr}


class FaultingMockSetup:
    """A mock device attached to a nested HWPT whose faults go to ``fault_id``: the lab's standard rig.

    IOAS -> mock device (auto domain) -> NEST_PARENT HWPT -> nested selftest HWPT with the fault
    queue -> replace the device onto it. Teardown follows the kernel selftest's order.
    """

    def __init__(self, ctx: Iommufd, fault_id: int) -> None:
        self.ctx = ctx
        self._stack: list[Object] = []
        try:
            self.ioas = self._keep(Ioas.alloc(ctx))
            self.device = self._keep(MockDevice.create(ctx, self.ioas.id))
            self._ioas_domain = self.device.hwpt_id
            self.parent = self._keep(Hwpt.nest_parent(ctx, dev_id=self.device.dev_id, ioas_id=self.ioas.id))
            self.nested = self._keep(Hwpt.nested(ctx, dev_id=self.device.dev_id, parent_id=self.parent.id,
                                                 data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                                                 data=SELFTEST_NESTED_DATA, fault_id=fault_id))
            self.device.replace(self.nested.id)
        except BaseException:
            self.close()
            raise

    def _keep(self, obj):
        self._stack.append(obj)
        return obj

    def close(self) -> None:
        """Move the device back to its IOAS domain (answering what is pending), then destroy in reverse."""
        device = getattr(self, "device", None)
        if device is not None and device.hwpt_id != self._ioas_domain:
            self._ioas_domain = device.replace(self.ioas.id)
        while self._stack:
            self._stack.pop().destroy()

    def __enter__(self) -> FaultingMockSetup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
