"""What the running kernel offers: each feature is tried for real, not guessed from a version."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.fault import FaultQueue
from iopfd.iommufd.hwpt import Hwpt
from iopfd.iommufd.ioas import Ioas
from iopfd.iommufd.ioctl import ioctl, lib, new
from iopfd.iommufd.selftest import SELFTEST_NESTED_DATA, FaultingMockSetup, MockDevice
from iopfd.iommufd.vfio import list_devices

YES, NO, UNKNOWN = "yes", "no", "unknown"
PROBE_PASID = 100
# The features, by the names `iopfd probe` prints (and the lab kernels, ioas-map and the tests look up).
IOMMUFD = "iommufd"
FAULT_QUEUES = "fault queues"
MOCK_IOMMU = "selftest mock IOMMU"
FAULTS_END_TO_END = "I/O page faults end to end"
PAGING_HWPT_FAULTS = "faults on paging HWPTs"
PASID_ATTACH = "PASID attach"
VIOMMU = "vIOMMU"
VEVENTQ = "vEVENTQ"
VFIO_DEVICES = "VFIO cdev devices"


@dataclass(frozen=True)
class Feature:
    name: str
    status: str
    detail: str


def _known_ioctl(ctx: Iommufd, name: str, ctype: str) -> tuple[str, str]:
    """Issue ``name`` with an all-zero argument: ENOTTY means the kernel lacks it, any other answer that it has it."""
    try:
        ioctl(ctx.fd, name, new(ctype))
    except IommufdError as exc:
        if exc.errno == errno.ENOTTY:
            return NO, f"{name} unknown to this kernel"
    return YES, f"{name} known"


def probe(device: str = "/dev/iommu") -> list[Feature]:
    features: list[Feature] = []
    vfio = list_devices()
    vfio_feature = Feature(VFIO_DEVICES, YES if vfio else NO, ", ".join(vfio) or "none in /dev/vfio/devices")
    try:
        ctx = Iommufd.open(device)
    except IommufdError as exc:
        features.append(Feature(IOMMUFD, NO, str(exc)))
        for name in (FAULT_QUEUES, MOCK_IOMMU, FAULTS_END_TO_END, PAGING_HWPT_FAULTS, PASID_ATTACH, VIOMMU, VEVENTQ):
            features.append(Feature(name, UNKNOWN, f"needs {device}"))
        return [*features, vfio_feature]

    with ctx:
        features.append(Feature(IOMMUFD, YES, f"{device} opened"))
        try:
            with FaultQueue.alloc(ctx) as queue:
                features.append(Feature(FAULT_QUEUES, YES, f"IOMMU_FAULT_QUEUE_ALLOC gave fault object {queue.id}"))
        except IommufdError as exc:
            features.append(Feature(FAULT_QUEUES, NO, str(exc)))
        features.extend(_probe_selftest(ctx))
        for name, ioctl_name, ctype in ((VIOMMU, "IOMMU_VIOMMU_ALLOC", "struct iommu_viommu_alloc"),
                                        (VEVENTQ, "IOMMU_VEVENTQ_ALLOC", "struct iommu_veventq_alloc")):
            features.append(Feature(name, *_known_ioctl(ctx, ioctl_name, ctype)))
    return [*features, vfio_feature]


def _probe_selftest(ctx: Iommufd) -> list[Feature]:
    try:
        with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device:
            found = [Feature(MOCK_IOMMU, YES, "IOMMU_TEST_CMD created a mock device")]
            with FaultQueue.alloc(ctx) as queue:
                try:
                    with Hwpt.alloc(ctx, dev_id=device.dev_id, pt_id=ioas.id, fault_id=queue.id):
                        found.append(Feature(PAGING_HWPT_FAULTS, YES, "a paging HWPT took a fault_id"))
                except IommufdError as exc:
                    found.append(Feature(PAGING_HWPT_FAULTS, NO, str(exc)))
    except IommufdError as exc:
        return [Feature(MOCK_IOMMU, NO, str(exc)),
                Feature(FAULTS_END_TO_END, UNKNOWN, "needs the mock IOMMU or a PRI-capable device"),
                Feature(PAGING_HWPT_FAULTS, UNKNOWN, "needs the mock IOMMU or a PRI-capable device"),
                Feature(PASID_ATTACH, UNKNOWN, "needs the mock IOMMU or a PASID-capable device")]
    found.insert(1, _probe_fault_round_trip(ctx))
    found.append(_probe_pasid_attach(ctx))
    return found


def _probe_pasid_attach(ctx: Iommufd) -> Feature:
    """A fault-capable HWPT attached at a PASID of a PASID-capable mock device (the RID on a
    PASID-compatible HWPT first, as the kernel requires)."""
    name = PASID_ATTACH
    try:
        with Ioas.alloc(ctx) as ioas, FaultQueue.alloc(ctx) as queue:
            try:
                device = MockDevice.create(ctx, ioas.id, flags=lib.MOCK_FLAGS_DEVICE_PASID)
            except IommufdError as exc:
                return Feature(name, NO, f"no PASID-capable mock device: {exc}")
            with device, Hwpt.nest_parent(ctx, dev_id=device.dev_id, ioas_id=ioas.id) as parent, \
                    Hwpt.alloc(ctx, dev_id=device.dev_id, pt_id=parent.id, flags=lib.IOMMU_HWPT_ALLOC_PASID,
                               data_type=lib.IOMMU_HWPT_DATA_SELFTEST, data=SELFTEST_NESTED_DATA,
                               fault_id=queue.id) as nested:
                device.replace(nested.id)
                try:
                    device.pasid_attach(PROBE_PASID, nested.id)
                    attached = device.pasid_attached(PROBE_PASID, nested.id)
                    device.pasid_detach(PROBE_PASID)
                finally:
                    device.replace(ioas.id)
    except IommufdError as exc:
        return Feature(name, NO, str(exc))
    if not attached:
        return Feature(name, NO, f"PASID_ATTACH succeeded but pasid {PROBE_PASID} does not show the HWPT")
    return Feature(name, YES, f"a fault-capable HWPT attached at pasid {PROBE_PASID} of a mock device")


def _probe_fault_round_trip(ctx: Iommufd) -> Feature:
    name = FAULTS_END_TO_END
    try:
        with FaultQueue.alloc(ctx) as queue, FaultingMockSetup(ctx, queue.id) as rig:
            rig.device.trigger_iopf(addr=0x100000, grpid=1)
            groups = queue.read()
            consumed = queue.respond([(g.cookie, 0) for g in groups])
    except IommufdError as exc:
        return Feature(name, NO, str(exc))
    if len(groups) != 1 or consumed != 1:
        return Feature(name, NO, f"triggered 1 fault, read {len(groups)} groups, {consumed} answered")
    return Feature(name, YES, "mock fault triggered, read and answered")
