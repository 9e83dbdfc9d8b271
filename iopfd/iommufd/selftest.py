"""The kernel's mock IOMMU (CONFIG_IOMMUFD_TEST): mock devices, replace, and injected page faults.

Used by the kernel lab and the demo to drive the real iommufd fault path without hardware.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TypeVar

from iopfd.iommufd.context import Closing, Iommufd, Object
from iopfd.iommufd.errors import InvalidArgument
from iopfd.iommufd.hwpt import Hwpt
from iopfd.iommufd.ioas import Ioas
from iopfd.iommufd.ioctl import lib, new
from iopfd.iommufd.viommu import Vdevice, VeventQueue, Viommu
from iopfd.uapi_ffi import ffi

NO_SELFTEST = ("the kernel lacks CONFIG_IOMMUFD_TEST (the selftest mock IOMMU); "
               "run inside the kernel lab (iopfd-dev lab run ...)")
NO_IOPF = ("the kernel lacks IOMMU_IOPF, so no device can attach to a fault-capable HWPT; "
           "enable INTEL_IOMMU_SVM or AMD_IOMMU in its config")
NO_PASID_OPS = ("this kernel's selftest has no PASID ops (Linux 7.x adds them); check iopfd probe's "
                "\"PASID attach\" line")
KeptObject = TypeVar("KeptObject", bound=Object)
# struct iommu_hwpt_selftest up to iotlb: all a nested mock HWPT reads, on every kernel.
SELFTEST_NESTED_DATA = struct.pack("<I", lib.IOMMU_TEST_IOTLB_DEFAULT)


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

    ctx: Iommufd  # where the device is bound

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
        cmd = build_test_cmd(lib.IOMMU_TEST_OP_TRIGGER_IOPF,
                             trigger_iopf=self._trigger_fields(addr, pasid, grpid, perm))
        return lib.IOMMU_TEST_CMD, bytes(ffi.buffer(cmd))

    def trigger_vevent(self) -> None:
        """Report one selftest vEVENT (its payload: this device's virt_id) to the vIOMMU of the nested
        HWPT the device is attached to (7.x)."""
        selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_TRIGGER_VEVENT, trigger_vevent={"dev_id": self.dev_id}, hints={
            errno.ENOENT: f"device {self.dev_id} is not attached to a nested HWPT of a vIOMMU through a vDEVICE",
            errno.EOPNOTSUPP: "the device's vIOMMU has no vEVENTQ of type IOMMU_VEVENTQ_TYPE_SELFTEST",
        })

    def _trigger_fields(self, addr: int, pasid: int, grpid: int, perm: int) -> dict[str, int]:
        return {"dev_id": self.dev_id, "pasid": pasid, "grpid": grpid, "perm": perm, "addr": addr}

    # PASID ops (Linux 7.x selftest). The device must be created with MOCK_FLAGS_DEVICE_PASID, and its RID
    # attached to a HWPT allocated with IOMMU_HWPT_ALLOC_PASID before any PASID can be attached.
    def pasid_attach(self, pasid: int, pt_id: int) -> int:
        """Attach ``pt_id`` (a HWPT allocated with IOMMU_HWPT_ALLOC_PASID) at ``pasid``; returns the HWPT attached."""
        cmd = selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_PASID_ATTACH, self.id,
                           pasid_attach={"pasid": pasid, "pt_id": pt_id}, hints=_pasid_hints(pasid, pt_id))
        return cmd.pasid_attach.pt_id

    def pasid_replace(self, pasid: int, pt_id: int) -> int:
        """Attach ``pt_id`` at ``pasid`` in place of what is attached there (answering its pending groups)."""
        hints = {**_pasid_hints(pasid, pt_id), errno.EINVAL: f"nothing is attached at pasid {pasid} to replace, or "
                                                             f"pt_id {pt_id} is not a HWPT allocated with "
                                                             "IOMMU_HWPT_ALLOC_PASID"}
        cmd = selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_PASID_REPLACE, self.id,
                           pasid_replace={"pasid": pasid, "pt_id": pt_id}, hints=hints)
        return cmd.pasid_replace.pt_id

    def pasid_detach(self, pasid: int) -> None:
        """Detach whatever is attached at ``pasid`` (nothing attached is no error); pending groups are answered."""
        selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_PASID_DETACH, self.id, pasid_detach={"pasid": pasid},
                     hints={errno.EOPNOTSUPP: NO_PASID_OPS})

    def pasid_attached(self, pasid: int, hwpt_id: int) -> bool:
        """Whether ``hwpt_id`` is what is attached at ``pasid`` (``hwpt_id`` 0: whether nothing is)."""
        try:
            selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_PASID_CHECK_HWPT, self.id,
                         pasid_check={"pasid": pasid, "hwpt_id": hwpt_id}, hints={errno.EOPNOTSUPP: NO_PASID_OPS})
        except InvalidArgument:
            return False
        return True


def _pasid_hints(pasid: int, pt_id: int) -> dict[int, str]:
    return {
        errno.EOPNOTSUPP: NO_PASID_OPS,
        errno.EINVAL: (f"pt_id {pt_id} must be a HWPT allocated with IOMMU_HWPT_ALLOC_PASID (not an IOAS), the "
                       "device must be created with MOCK_FLAGS_DEVICE_PASID, and its RID attached to a "
                       "PASID-compatible HWPT first"),
        errno.EBUSY: f"pasid {pasid} already has a HWPT attached: detach it or use pasid_replace",
    }


class MockAccess(Closing):
    """A selftest access object on an IOAS (IOMMU_TEST_OP_CREATE_ACCESS): reads and writes IOVAs the way an
    emulated device (mdev-style) does, through the IOAS's mappings rather than any HWPT. An fd; close it."""

    def __init__(self, ctx: Iommufd, fd: int) -> None:
        self.ctx = ctx
        self.fd = fd

    @classmethod
    def create(cls, ctx: Iommufd, ioas_id: int) -> MockAccess:
        cmd = selftest_cmd(ctx, lib.IOMMU_TEST_OP_CREATE_ACCESS, ioas_id,
                           hints={errno.ENOENT: f"{ioas_id} is not an IOAS of this iommufd"})
        return cls(ctx, cmd.create_access.out_access_fd)

    def read(self, iova: int, length: int) -> bytes:
        """IOMMU_TEST_OP_ACCESS_RW: ``length`` bytes at ``iova`` of the IOAS."""
        buffer = ffi.new("char[]", length)
        self._rw(iova, buffer, length, 0)
        return bytes(ffi.buffer(buffer, length))

    def write(self, iova: int, data: bytes) -> None:
        self._rw(iova, ffi.from_buffer(data), len(data), lib.MOCK_ACCESS_RW_WRITE)

    def _rw(self, iova: int, buffer, length: int, flags: int) -> None:
        selftest_cmd(self.ctx, lib.IOMMU_TEST_OP_ACCESS_RW, self.fd,
                     access_rw={"iova": iova, "length": length, "uptr": int(ffi.cast("uintptr_t", buffer)),
                                "flags": flags},
                     hints={errno.ENOENT: f"IOVA range [{iova:#x}, {iova + length:#x}) is not (all) mapped in the IOAS",
                            errno.EPERM: "the IOAS mapping lacks the permission (READABLE/WRITEABLE) this access "
                                         "needs"})

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class FaultingMockSetup(Closing):
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
            self._build(fault_id)
        except BaseException:
            self.close()
            raise

    def _build(self, fault_id: int) -> None:
        """From the IOAS domain on: the nesting parent, the nested HWPT with the fault queue, and the device on it."""
        self.parent = self._keep(Hwpt.nest_parent(self.ctx, dev_id=self.device.dev_id, ioas_id=self.ioas.id))
        self.nested = self._keep(Hwpt.nested(self.ctx, dev_id=self.device.dev_id, parent_id=self.parent.id,
                                             data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                                             data=SELFTEST_NESTED_DATA, fault_id=fault_id))
        self.device.replace(self.nested.id)

    def _keep(self, obj: KeptObject) -> KeptObject:
        self._stack.append(obj)
        return obj

    def close(self) -> None:
        """Move the device back to its IOAS domain (answering what is pending), then destroy in reverse."""
        device = getattr(self, "device", None)
        if device is not None and device.hwpt_id != self._ioas_domain:
            self._ioas_domain = device.replace(self.ioas.id)
        while self._stack:
            self._stack.pop().destroy()


class PagingMockSetup(FaultingMockSetup):
    """Demand paging's rig (Linux 6.13+): faults on the IOAS's own IOVAs go to ``fault_id``.

    IOAS -> mock device -> paging HWPT on the IOAS with the fault queue -> replace the device onto it.
    """

    def _build(self, fault_id: int) -> None:
        self.paging = self._keep(Hwpt.alloc(self.ctx, dev_id=self.device.dev_id, pt_id=self.ioas.id,
                                            fault_id=fault_id))
        self.device.replace(self.paging.id)


class ViommuMockSetup(FaultingMockSetup):
    """The vIOMMU rig (7.x): faults go to ``fault_id`` and the device's vEVENTs to ``self.events``.

    IOAS -> mock device -> NEST_PARENT HWPT -> selftest vIOMMU on it -> vDEVICE (``virt_id``) ->
    nested selftest HWPT allocated on the vIOMMU with the fault queue -> replace the device onto it
    (the kernel refuses that before the vDEVICE exists) -> a selftest vEVENTQ of ``depth`` events.
    """

    def __init__(self, ctx: Iommufd, fault_id: int, *, virt_id: int = 0x99, depth: int = 64) -> None:
        self.virt_id = virt_id
        self.depth = depth
        super().__init__(ctx, fault_id)

    def _build(self, fault_id: int) -> None:
        ctx, virt_id, depth = self.ctx, self.virt_id, self.depth
        self.parent = self._keep(Hwpt.nest_parent(ctx, dev_id=self.device.dev_id, ioas_id=self.ioas.id))
        self.viommu = self._keep(Viommu.alloc(ctx, dev_id=self.device.dev_id, hwpt_id=self.parent.id,
                                              viommu_type=lib.IOMMU_VIOMMU_TYPE_SELFTEST))
        self.vdevice = self._keep(Vdevice.alloc(ctx, viommu_id=self.viommu.id, dev_id=self.device.dev_id,
                                                virt_id=virt_id))
        self.nested = self._keep(Hwpt.nested(ctx, dev_id=self.device.dev_id, parent_id=self.viommu.id,
                                             data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                                             data=SELFTEST_NESTED_DATA, fault_id=fault_id))
        self.device.replace(self.nested.id)
        self.events = self._keep(VeventQueue.alloc(ctx, viommu_id=self.viommu.id,
                                                   event_type=lib.IOMMU_VEVENTQ_TYPE_SELFTEST, depth=depth))
