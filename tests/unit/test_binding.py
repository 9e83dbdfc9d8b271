"""The committed binding is generated from bindings/iommufd.cdef and says what the ABI sheet says."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from iopfd._uapi import ffi
from iopfd.iommufd.uapi import lib, new

REPO = Path(__file__).resolve().parents[2]


def test_committed_module_is_fresh(tmp_path):
    builder = runpy.run_path(str(REPO / "bindings" / "build_uapi.py"))
    fresh = tmp_path / "_uapi.py"
    builder["generate"](fresh)
    assert fresh.read_text() == (REPO / "iopfd" / "_uapi.py").read_text(), \
        f"stale: run {sys.executable} bindings/build_uapi.py"


def test_fault_abi_sizes_and_offsets():
    assert ffi.sizeof("struct iommu_hwpt_pgfault") == 40
    assert ffi.offsetof("struct iommu_hwpt_pgfault", "addr") == 24
    assert ffi.offsetof("struct iommu_hwpt_pgfault", "cookie") == 36
    assert ffi.sizeof("struct iommu_hwpt_page_response") == 8
    assert ffi.sizeof("struct iommu_hwpt_alloc") == 48
    assert ffi.offsetof("struct iommu_hwpt_alloc", "fault_id") == 40
    assert ffi.sizeof("struct iommu_test_cmd") == 72
    assert ffi.offsetof("struct iommu_test_cmd", "trigger_iopf", "addr") == 32
    assert ffi.offsetof("struct iommu_test_cmd", "last") == 64


def test_ioctl_numbers_are_io_semicolon():
    assert (lib.IOMMU_DESTROY, lib.IOMMU_HWPT_ALLOC, lib.IOMMU_FAULT_QUEUE_ALLOC, lib.IOMMU_TEST_CMD) == \
        (0x3B80, 0x3B89, 0x3B8E, 0x3BA0)
    assert lib.VFIO_DEVICE_BIND_IOMMUFD == 0x3B00 | (100 + 18)


def test_new_sets_the_size_field():
    assert new("struct iommu_fault_alloc").size == 16
    assert new("struct vfio_device_bind_iommufd").argsz == 24


def test_vfio_bind_passes_the_prefix_every_kernel_takes(monkeypatch):
    from iopfd.iommufd import Iommufd, vfio

    calls = []
    monkeypatch.setattr(vfio, "ioctl", lambda fd, name, cmd, *, size=None, hints=None: calls.append((cmd.argsz, size)))
    with vfio.VfioDevice("/dev/null") as device:
        device.bind(Iommufd(-1, owned=False))
    assert calls == [(16, 16)]  # 6.12's struct; 7.x added token_uuid_ptr after it
    assert new("struct iommu_hwpt_alloc", dev_id=7).dev_id == 7
