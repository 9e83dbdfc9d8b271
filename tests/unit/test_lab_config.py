"""The lab's cache key and config checks, without building a kernel."""

from __future__ import annotations

import dataclasses

import pytest

from iopfd.lab import kernel as lab_kernel
from iopfd.lab.errors import LabError


def test_cache_key_changes_with_the_source_version_and_the_fragment(tmp_path, monkeypatch):
    k = lab_kernel.KERNELS["6.12"]
    key = lab_kernel.cache_key(k)
    assert key.startswith("linux-6.12.117-1~deb12u1-")
    assert lab_kernel.cache_key(dataclasses.replace(k, package_version="6.12.999-1")) != key
    fragment = tmp_path / "base.config"
    fragment.write_text((lab_kernel.CONFIG_DIR / "base.config").read_text() + "CONFIG_EXTRA=y\n")
    monkeypatch.setattr(lab_kernel, "CONFIG_DIR", tmp_path)
    assert lab_kernel.cache_key(k) != key


def test_fragment_asks_for_the_fault_path_options():
    text = (lab_kernel.CONFIG_DIR / "base.config").read_text()
    for option in ("CONFIG_IOMMUFD=y", "CONFIG_IOMMUFD_TEST=y", "CONFIG_INTEL_IOMMU_SVM=y", "CONFIG_9P_FS=y"):
        assert option in text


def test_lost_options_are_named(tmp_path):
    fragment = tmp_path / "frag.config"
    fragment.write_text("CONFIG_IOMMUFD=y\nCONFIG_9P_FS=y\n")
    final = tmp_path / ".config"
    final.write_text("CONFIG_IOMMUFD=y\nCONFIG_IOMMUFD_TEST=y\n# CONFIG_IOMMU_IOPF is not set\n")
    with pytest.raises(LabError) as info:
        lab_kernel._check_config(lab_kernel.KERNELS["6.12"], final, [str(fragment)])
    assert "CONFIG_9P_FS=y (got unset)" in str(info.value)
    assert "CONFIG_IOMMU_IOPF=y (got unset)" in str(info.value)
    assert "CONFIG_IOMMUFD=y" not in str(info.value)


def test_unknown_kernel_is_refused():
    with pytest.raises(LabError, match="unknown lab kernel '5.4'"):
        lab_kernel.ensure_built("5.4")
