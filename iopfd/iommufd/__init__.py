"""Typed objects over the iommufd ioctls; see docs/architecture.md.

The selftest mock device (``iopfd.iommufd.selftest``) and VFIO device listing (``iopfd.iommufd.vfio``)
are imported from their modules by those who need them (the probe, the tooling), never by the daemon."""

from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.errors import (
    Busy,
    InvalidArgument,
    IommufdError,
    IommufdUnavailable,
    NotFound,
    NotSupported,
    PermissionDenied,
)
from iopfd.iommufd.fault import (
    INVALID,
    LAST_PAGE,
    PASID_VALID,
    SUCCESS,
    Fault,
    FaultGroup,
    FaultQueue,
    MalformedFaultData,
    parse_groups,
    respond_all,
)
from iopfd.iommufd.hwpt import Hwpt
from iopfd.iommufd.ioas import Ioas
from iopfd.iommufd.ioctl import lib
from iopfd.iommufd.viommu import SequenceTracker, Vdevice, VeventQueue, VeventRecord, Viommu

PERM_READ = lib.IOMMU_PGFAULT_PERM_READ
PERM_WRITE = lib.IOMMU_PGFAULT_PERM_WRITE
PERM_EXEC = lib.IOMMU_PGFAULT_PERM_EXEC
PERM_PRIV = lib.IOMMU_PGFAULT_PERM_PRIV

__all__ = [
    "Busy", "Fault", "FaultGroup", "FaultQueue", "Hwpt", "INVALID", "InvalidArgument",
    "Ioas", "Iommufd", "IommufdError", "IommufdUnavailable", "LAST_PAGE", "MalformedFaultData",
    "NotFound", "NotSupported", "PASID_VALID", "PERM_EXEC", "PERM_PRIV", "PERM_READ", "PERM_WRITE",
    "PermissionDenied", "SUCCESS", "lib", "parse_groups",
    "respond_all",
    "SequenceTracker", "Vdevice", "VeventQueue", "VeventRecord", "Viommu",
]
