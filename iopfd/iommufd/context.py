"""An iommufd context: one open /dev/iommu, the owner of every object allocated through it."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from iopfd.iommufd.errors import IommufdError, IommufdUnavailable, error_from
from iopfd.iommufd.ioctl import ioctl, new
from iopfd.uapi_ffi import ffi

DEVICE = "/dev/iommu"


@dataclass(frozen=True)
class HwInfo:
    """What IOMMU_GET_HW_INFO reports. There is no PRI/IOPF bit: that shows only at attach time."""

    data_type: int
    data: bytes
    max_pasid_log2: int  # 0: no PASID support
    capabilities: int    # IOMMU_HW_CAP_*


class Closing:
    """Something held open (an fd, a socket) that its ``with`` block closes."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Iommufd(Closing):
    """An open ``/dev/iommu``. Closing it destroys every object not kept alive by an open fault fd."""

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        self.fd = fd
        self._owned = owned

    @classmethod
    def open(cls, path: str = DEVICE) -> Iommufd:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IommufdUnavailable(
                f"open {path}", errno.ENOENT,
                "no /dev/iommu: the kernel was built without CONFIG_IOMMUFD (or, with IOMMUFD=m, "
                "the module is not loaded: modprobe iommufd)",
            ) from None
        except OSError as exc:
            raise error_from(f"open {path}", exc) from None
        return cls(fd)

    def ioctl(self, name: str, cdata, **kwargs) -> None:
        ioctl(self.fd, name, cdata, **kwargs)

    def destroy(self, object_id: int) -> None:
        """IOMMU_DESTROY: any object ID. EBUSY while something still uses the object."""
        self.ioctl("IOMMU_DESTROY", new("struct iommu_destroy", id=object_id))

    def hw_info(self, dev_id: int, data_len: int = 64) -> HwInfo:
        """IOMMU_GET_HW_INFO for a bound device: its IOMMU type, vendor data and PASID capability."""
        data = ffi.new("char[]", data_len)
        cmd = new("struct iommu_hw_info", dev_id=dev_id, data_len=data_len, data_uptr=int(ffi.cast("uintptr_t", data)))
        self.ioctl("IOMMU_GET_HW_INFO", cmd,
                   hints={errno.ENOENT: f"dev_id {dev_id} is not a device bound to this iommufd"})
        return HwInfo(cmd.out_data_type, bytes(ffi.buffer(data, cmd.data_len)), cmd.out_max_pasid_log2,
                      cmd.out_capabilities)

    def close(self) -> None:
        if self.fd >= 0 and self._owned:
            os.close(self.fd)
        self.fd = -1


class Object:
    """An iommufd object with an ID; leaving its ``with`` block destroys it."""

    def __init__(self, ctx: Iommufd | None, object_id: int) -> None:
        self.ctx = ctx  # None only for an FdObject adopted from elsewhere (object_id 0)
        self.id = object_id

    def destroy(self) -> None:
        if self.id and self.ctx is not None:
            self.ctx.destroy(self.id)
            self.id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id}>"


def describe_fd(fd: int) -> str:
    """What ``/proc/self/fd/N`` says the fd is, e.g. ``anon_inode:[iommufd-pgfault]``."""
    return os.readlink(f"/proc/self/fd/{fd}")


class FdObject(Object):
    """An object that comes with an fd of its own (a fault queue, a vEVENTQ). ``ctx`` is None for an fd
    adopted from elsewhere: closing it is then all there is to do."""

    ANON_INODE: ClassVar[str]  # what describe_fd() says an fd of this kind is
    DESCRIBED_AS: ClassVar[str]  # in errors: what the fd should have been, and where such an fd comes from

    @classmethod
    def adopt(cls, fd: int, *args: Any, **kwargs: Any) -> Self:
        """An fd of this kind opened elsewhere (inherited from a VMM, or received over a socket), with
        the rest of the constructor's arguments; IommufdError saying what the fd is otherwise."""
        try:
            what = describe_fd(fd)
        except OSError:
            what = "not an open file descriptor"
        if what != cls.ANON_INODE:
            raise IommufdError(f"adopt fd {fd}", errno.EBADF, f"it is {what}, not {cls.DESCRIBED_AS}")
        return cls(None, 0, fd, *args, **kwargs)

    def __init__(self, ctx: Iommufd | None, object_id: int, fd: int) -> None:
        super().__init__(ctx, object_id)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self) -> None:
        self.close()  # the object cannot be destroyed while its fd is open
        super().destroy()
