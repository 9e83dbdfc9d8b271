"""VFIO cdev devices (/dev/vfio/devices/vfioN) bound to an iommufd.

The PASID forms of attach/detach use the longer structs of newer kernels; without a PASID the
6.12-sized prefix is passed, so both kernels accept the call. Bind passes the 6.12-sized prefix
too (7.x added a token pointer iopfd does not use).
"""

from __future__ import annotations

import errno
import glob
import os

from iopfd._uapi import ffi
from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.errors import error_for
from iopfd.iommufd.uapi import ioctl, lib, new

DEVICES_GLOB = "/dev/vfio/devices/vfio*"
BIND_SIZE_NO_TOKEN = ffi.offsetof("struct vfio_device_bind_iommufd", "token_uuid_ptr")
ATTACH_SIZE_NO_PASID = ffi.offsetof("struct vfio_device_attach_iommufd_pt", "pasid")
DETACH_SIZE_NO_PASID = ffi.offsetof("struct vfio_device_detach_iommufd_pt", "pasid")
PASID_HINT = ("this kernel or device does not take PASID attachments (VFIO PASID attach needs Linux 6.15+ "
              "and a PASID-capable device)")


def list_devices() -> list[str]:
    return sorted(glob.glob(DEVICES_GLOB), key=lambda p: int(p.rsplit("vfio", 1)[1] or 0))


class VfioDevice:
    """An open VFIO device cdev. Closing it unbinds it from the iommufd."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = None
            if exc.errno == errno.ENOENT:
                hint = "no such VFIO cdev: bind the device to vfio-pci and use a kernel with VFIO_DEVICE_CDEV"
            raise error_for(f"open {path}", exc.errno, hint) from None
        self.dev_id = 0

    def bind(self, ctx: Iommufd) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the iommufd device ID (``dev_id`` in fault records)."""
        cmd = new("struct vfio_device_bind_iommufd", iommufd=ctx.fd, argsz=BIND_SIZE_NO_TOKEN)
        ioctl(self.fd, "VFIO_DEVICE_BIND_IOMMUFD", cmd, size=BIND_SIZE_NO_TOKEN, hints={
            errno.EINVAL: "the device is already bound, or the fd is not an iommufd"})
        self.dev_id = cmd.out_devid
        return self.dev_id

    def attach(self, pt_id: int, *, pasid: int | None = None) -> int:
        """Attach (or replace) to an IOAS or HWPT, at the RID or at ``pasid``; returns the HWPT attached."""
        cmd = new("struct vfio_device_attach_iommufd_pt", pt_id=pt_id)
        size = None
        hints = {errno.ENODEV: "the device or IOMMU cannot take I/O page faults (no PRI, or kernel without IOMMU_IOPF)"}
        if pasid is None:
            size = cmd.argsz = ATTACH_SIZE_NO_PASID
        else:
            cmd.flags, cmd.pasid = lib.VFIO_DEVICE_ATTACH_PASID, pasid
            hints[errno.EINVAL] = PASID_HINT
        ioctl(self.fd, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", cmd, size=size, hints=hints)
        return cmd.pt_id

    def detach(self, *, pasid: int | None = None) -> None:
        cmd = new("struct vfio_device_detach_iommufd_pt")
        size = None
        if pasid is None:
            size = cmd.argsz = DETACH_SIZE_NO_PASID
        else:
            cmd.flags, cmd.pasid = lib.VFIO_DEVICE_DETACH_PASID, pasid
        ioctl(self.fd, "VFIO_DEVICE_DETACH_IOMMUFD_PT", cmd, size=size, hints={errno.EINVAL: PASID_HINT})

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VfioDevice:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
