"""One exception hierarchy for iommufd and VFIO ioctls.

Each error carries the ioctl name and errno, and its message names the likely cause and the fix.
Hints specific to one call are passed where the call is made (see ``ioctl``); the table below
holds the ones that are true wherever the errno appears.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping


class IommufdError(OSError):
    """An iommufd or VFIO operation failed."""

    def __init__(self, operation: str, err: int, hint: str | None = None) -> None:
        self.operation = operation
        # Linux aliases ENOTSUP to EOPNOTSUPP; the uapi documents the latter.
        name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, str(err))
        message = f"{operation} failed: {name} ({os.strerror(err)})"
        if hint:
            message += f": {hint}"
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class IommufdUnavailable(IommufdError):
    """/dev/iommu cannot be opened."""


class NotSupported(IommufdError):
    """The kernel does not offer this (ENOTTY, EOPNOTSUPP, ENODEV)."""


class PermissionDenied(IommufdError):
    """EACCES or EPERM."""


class Busy(IommufdError):
    """EBUSY: the object is still in use."""


class NotFound(IommufdError):
    """ENOENT: no object with that ID (or no such IOVA)."""


class InvalidArgument(IommufdError):
    """EINVAL."""


_CLASSES = {
    errno.ENOTTY: NotSupported,
    errno.EOPNOTSUPP: NotSupported,
    errno.ENODEV: NotSupported,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EBUSY: Busy,
    errno.ENOENT: NotFound,
    errno.EINVAL: InvalidArgument,
}

_GENERAL_HINTS = {
    errno.ENOTTY: "this kernel does not know this ioctl; it needs a newer kernel "
                  "(fault queues need 6.11+, vIOMMU/vEVENTQ 6.13+/6.15+)",
    errno.EACCES: "permission denied: run as root, or give this user read-write access to the device "
                  "(udev rule, or DeviceAllow= in the systemd unit)",
    errno.EPERM: "operation not permitted: this needs CAP_SYS_RAWIO/CAP_IPC_LOCK or root",
    errno.EBUSY: "the object is still in use: destroy what depends on it first "
                 "(devices attached, nested HWPTs, open fault fds)",
    errno.ENOENT: "no such object ID in this iommufd context (or the IOVA is not mapped)",
}


def error_for(operation: str, err: int, hint: str | None = None) -> IommufdError:
    cls = _CLASSES.get(err, IommufdError)
    return cls(operation, err, hint or _GENERAL_HINTS.get(err))


def error_from(operation: str, exc: OSError, hints: Mapping[int, str] | None = None) -> IommufdError:
    """error_for() the OSError of a failed system call, with the hint ``hints`` has for its errno."""
    assert exc.errno is not None  # a system call's OSError always carries its errno
    return error_for(operation, exc.errno, (hints or {}).get(exc.errno))
