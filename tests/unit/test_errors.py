"""Errors carry the operation and errno, pick the right class and name cause and fix."""

from __future__ import annotations

import errno
import os

import pytest

from iopfd.iommufd import (
    Busy,
    FaultQueue,
    Iommufd,
    IommufdError,
    IommufdUnavailable,
    NotFound,
    NotSupported,
    PermissionDenied,
)
from iopfd.iommufd.errors import error_for
from iopfd.iommufd.selftest import NO_SELFTEST


@pytest.mark.parametrize(("err", "cls"), [
    (errno.ENOTTY, NotSupported), (errno.EOPNOTSUPP, NotSupported), (errno.ENODEV, NotSupported),
    (errno.EACCES, PermissionDenied), (errno.EPERM, PermissionDenied), (errno.EBUSY, Busy),
    (errno.ENOENT, NotFound), (errno.E2BIG, IommufdError),
])
def test_errno_selects_the_class(err, cls):
    exc = error_for("IOMMU_HWPT_ALLOC", err)
    assert type(exc) is cls
    assert exc.errno == err and exc.operation == "IOMMU_HWPT_ALLOC"
    name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode[err]
    assert str(exc).startswith(f"IOMMU_HWPT_ALLOC failed: {name}")


def test_a_call_site_hint_wins_over_the_general_one():
    assert NO_SELFTEST in str(error_for("IOMMU_TEST_CMD", errno.ENOTTY, NO_SELFTEST))
    assert "CONFIG_IOMMUFD_TEST" in NO_SELFTEST
    assert "newer kernel" in str(error_for("IOMMU_VEVENTQ_ALLOC", errno.ENOTTY))


def test_missing_dev_iommu_names_config_iommufd(tmp_path):
    with pytest.raises(IommufdUnavailable) as info:
        Iommufd.open(str(tmp_path / "iommu"))
    assert "CONFIG_IOMMUFD" in str(info.value) and info.value.errno == errno.ENOENT


def test_unreadable_device_is_permission_denied(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path  # root can open anything; a directory fails with EISDIR instead
        with pytest.raises(IommufdError) as info:
            Iommufd.open(str(target))
        assert info.value.errno == errno.EISDIR
    else:  # pragma: no cover - CI runs as root
        path = tmp_path / "iommu"
        path.write_text("")
        path.chmod(0)
        with pytest.raises(PermissionDenied):
            Iommufd.open(str(path))


@pytest.mark.parametrize("kind", ["pipe", "file", "closed"])
def test_adopting_an_fd_that_is_not_a_fault_fd_is_refused(kind, tmp_path):
    if kind == "pipe":
        fd, other = os.pipe()
        os.close(other)
    elif kind == "file":
        fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    else:
        fd = 999_999
    with pytest.raises(IommufdError) as info:
        FaultQueue.adopt(fd)
    message = str(info.value)
    assert "not an iommufd fault fd" in message and "anon_inode:[iommufd-pgfault]" in message
    assert {"pipe": "pipe:", "file": str(tmp_path / "f"), "closed": "not an open file descriptor"}[kind] in message
    if kind != "closed":
        os.close(fd)
