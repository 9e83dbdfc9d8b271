"""The committed binding is generated from bindings/iommufd.cdef and says what the ABI sheet says."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from iopfd.iommufd.ioctl import lib, new
from iopfd.uapi_ffi import ffi

REPO = Path(__file__).resolve().parents[2]


def test_committed_module_is_fresh(tmp_path):
    builder = runpy.run_path(str(REPO / "bindings" / "build_uapi.py"))
    fresh = tmp_path / "uapi_ffi.py"
    builder["generate"](fresh)
    assert fresh.read_text() == (REPO / "iopfd" / "uapi_ffi.py").read_text(), \
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


def test_new_sets_the_size_field():
    assert new("struct iommu_fault_alloc").size == 16
    assert new("struct iommu_hwpt_alloc", dev_id=7).dev_id == 7
