"""IOAS, HWPT and fault-queue objects against the lab kernel's iommufd."""

from __future__ import annotations

import errno
import fcntl
import mmap

import pytest

from iopfd.iommufd import PERM_WRITE, SUCCESS, Busy, Hwpt, Ioas, NotFound, NotSupported, lib
from iopfd.iommufd.context import describe_fd
from iopfd.iommufd.fault import FaultQueue
from iopfd.iommufd.probe import PAGING_HWPT_FAULTS
from iopfd.iommufd.selftest import SELFTEST_NESTED_DATA, MockDevice
from iopfd.uapi_ffi import ffi

pytestmark = [pytest.mark.kernel, pytest.mark.guest]
PAGE = mmap.PAGESIZE


def test_ioas_ids_are_distinct_and_destroy_is_final(ctx):
    first, second = Ioas.alloc(ctx), Ioas.alloc(ctx)
    assert 0 < first.id != second.id > 0
    ioas_id = first.id
    first.destroy()
    with pytest.raises(NotFound) as info:
        ctx.destroy(ioas_id)
    assert "IOMMU_DESTROY" in str(info.value) and info.value.errno == errno.ENOENT
    second.destroy()


def test_ioas_map_unmap_round_trip(ctx):
    memory = mmap.mmap(-1, 4 * PAGE)
    address = int(ffi.cast("uintptr_t", ffi.from_buffer(memory)))
    with Ioas.alloc(ctx) as ioas:
        iova = ioas.map(address, 4 * PAGE)
        assert iova % PAGE == 0
        fixed = ioas.map(address, 2 * PAGE, iova=0x40000000)
        assert fixed == 0x40000000
        assert ioas.unmap(fixed, 2 * PAGE) == 2 * PAGE
        assert ioas.unmap(iova, 4 * PAGE) == 4 * PAGE
        with pytest.raises(NotFound):
            ioas.unmap(iova, 4 * PAGE)


def test_ioas_map_fixed_iova_twice_is_refused(ctx):
    memory = mmap.mmap(-1, PAGE)
    address = int(ffi.cast("uintptr_t", ffi.from_buffer(memory)))
    with Ioas.alloc(ctx) as ioas:
        ioas.map(address, PAGE, iova=0x1000000)
        with pytest.raises(OSError) as info:
            ioas.map(address, PAGE, iova=0x1000000)
        assert info.value.errno == errno.EEXIST
        assert "already mapped" in str(info.value)
        assert ioas.unmap() == PAGE  # the default unmaps everything


def test_iova_ranges_narrow_to_the_mock_aperture(ctx):
    with Ioas.alloc(ctx) as ioas:
        ranges, alignment = ioas.iova_ranges()
        assert ranges == [(0, 2**64 - 1)]
        assert alignment >= 1
        with MockDevice.create(ctx, ioas.id):
            ranges, _ = ioas.iova_ranges()
            assert ranges == [(lib.MOCK_APERTURE_START, lib.MOCK_APERTURE_LAST)]


def test_nest_parent_hwpt_alloc_and_busy_while_nested_child_exists(ctx):
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device, \
            Hwpt.nest_parent(ctx, dev_id=device.dev_id, ioas_id=ioas.id) as parent:
        assert parent.id > 0
        nested = Hwpt.nested(ctx, dev_id=device.dev_id, parent_id=parent.id,
                             data_type=lib.IOMMU_HWPT_DATA_SELFTEST, data=SELFTEST_NESTED_DATA)
        with pytest.raises(Busy):
            ctx.destroy(parent.id)
        nested.destroy()


def test_fault_queue_fd_is_a_cloexec_pgfault_anon_inode(queue):
    assert queue.id > 0
    assert describe_fd(queue.fd) == FaultQueue.ANON_INODE
    assert fcntl.fcntl(queue.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_nested_hwpt_takes_a_fault_id_and_refuses_an_unknown_one(ctx, queue):
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device, \
            Hwpt.nest_parent(ctx, dev_id=device.dev_id, ioas_id=ioas.id) as parent:
        with Hwpt.nested(ctx, dev_id=device.dev_id, parent_id=parent.id, data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                         data=SELFTEST_NESTED_DATA, fault_id=queue.id) as nested:
            assert nested.id > 0
            with pytest.raises(Busy):  # the HWPT holds a reference on the fault object
                ctx.destroy(queue.id)
        with pytest.raises(NotFound):
            Hwpt.nested(ctx, dev_id=device.dev_id, parent_id=parent.id, data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                        data=SELFTEST_NESTED_DATA, fault_id=0xFFFFFFFF)


def test_fault_id_on_a_paging_hwpt_is_refused_with_the_way_out(ctx, queue, require_not):
    require_not(PAGING_HWPT_FAULTS)
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device:
        with pytest.raises(NotSupported) as info:
            Hwpt.alloc(ctx, dev_id=device.dev_id, pt_id=ioas.id, fault_id=queue.id)
        assert info.value.errno == errno.EOPNOTSUPP
        assert "nested HWPT" in str(info.value) and "6.13" in str(info.value)


def test_faults_on_a_paging_hwpt_are_delivered_and_answered(ctx, queue, require):
    require(PAGING_HWPT_FAULTS)
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device, \
            Hwpt.alloc(ctx, dev_id=device.dev_id, pt_id=ioas.id, fault_id=queue.id) as paging:
        device.replace(paging.id)
        device.trigger_iopf(addr=0x200000, grpid=3, perm=PERM_WRITE)
        (group,) = queue.read()
        (fault,) = group.faults
        assert (group.dev_id, fault.addr, fault.grpid, fault.perm) == (device.dev_id, 0x200000, 3, PERM_WRITE)
        assert queue.respond([(group.cookie, SUCCESS)]) == 1
        device.trigger_iopf(addr=0x201000)
        device.replace(ioas.id)  # away from the fault-capable HWPT: what is pending is answered for us
        assert queue.read() == []


def test_nest_parent_with_a_fault_id_is_refused(ctx, queue):
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device:
        with pytest.raises(NotSupported) as info:
            Hwpt.alloc(ctx, dev_id=device.dev_id, pt_id=ioas.id, flags=lib.IOMMU_HWPT_ALLOC_NEST_PARENT,
                       fault_id=queue.id)
        assert info.value.errno == errno.EOPNOTSUPP
        assert "nest parent cannot take a fault queue" in str(info.value)


def test_mock_device_replace_attaches_and_pins_the_nested_hwpt(ctx, queue):
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device, \
            Hwpt.nest_parent(ctx, dev_id=device.dev_id, ioas_id=ioas.id) as parent, \
            Hwpt.nested(ctx, dev_id=device.dev_id, parent_id=parent.id, data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                        data=SELFTEST_NESTED_DATA, fault_id=queue.id) as nested:
        auto_domain = device.hwpt_id
        assert device.replace(nested.id) == nested.id
        with pytest.raises(Busy):
            ctx.destroy(nested.id)
        device.replace(parent.id)
        assert device.hwpt_id == parent.id != auto_domain
        device.replace(ioas.id)


def test_destroying_the_fault_object_while_its_fd_is_open_is_busy(ctx, queue):
    with pytest.raises(Busy) as info:
        ctx.destroy(queue.id)
    assert info.value.errno == errno.EBUSY
    fault_id = queue.id
    queue.close()
    ctx.destroy(fault_id)  # with the fd closed the object goes
    queue.id = 0


def test_selftest_cmd_errors_name_the_ioctl(ctx):
    from iopfd.iommufd.selftest import selftest_cmd

    with pytest.raises(NotFound) as info:
        selftest_cmd(ctx, lib.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, 0xFFFF, mock_domain_replace={"pt_id": 1})
    assert str(info.value).startswith("IOMMU_TEST_CMD failed: ENOENT")


def test_hw_info_of_a_mock_device_reports_the_selftest_type(ctx):
    import struct

    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device:
        info = ctx.hw_info(device.dev_id)
        assert info.data_type == lib.IOMMU_HW_INFO_TYPE_SELFTEST
        assert len(info.data) == ffi.sizeof("struct iommu_test_hw_info")
        assert struct.unpack("<II", info.data)[1] == lib.IOMMU_HW_INFO_SELFTEST_REGVAL
        with pytest.raises(NotFound, match="not a device bound"):
            ctx.hw_info(0xFFFF)
