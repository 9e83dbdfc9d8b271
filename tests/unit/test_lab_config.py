"""The lab's cache key and config checks, without building a kernel."""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import textwrap

import pytest

from iopfd_dev.lab import kernel as lab_kernel
from iopfd_dev.lab import system
from iopfd_dev.lab.errors import LabError


def test_cache_key_changes_with_the_source_version_and_the_fragment(tmp_path, monkeypatch):
    k = lab_kernel.KERNELS["6.12"]
    key = lab_kernel.cache_key(k)
    assert key.startswith("linux-6.12.117-1~deb12u1-")
    assert lab_kernel.cache_key(dataclasses.replace(k, package_version="6.12.999-1")) != key
    for name in k.fragments:
        (tmp_path / name).write_text((lab_kernel.CONFIG_DIR / name).read_text())
    (tmp_path / "base.config").write_text((lab_kernel.CONFIG_DIR / "base.config").read_text() + "CONFIG_EXTRA=y\n")
    monkeypatch.setattr(lab_kernel, "CONFIG_DIR", tmp_path)
    assert lab_kernel.cache_key(k) != key


@pytest.mark.parametrize("name", sorted(lab_kernel.KERNELS))
def test_fragments_ask_for_the_fault_path_options(name):
    text = "".join((lab_kernel.CONFIG_DIR / f).read_text() for f in lab_kernel.KERNELS[name].fragments)
    for option in ("CONFIG_IOMMUFD=y", "CONFIG_IOMMUFD_TEST=y", "CONFIG_INTEL_IOMMU_SVM=y", "CONFIG_9P_FS=y"):
        assert option in text


@pytest.mark.parametrize("name", sorted(lab_kernel.KERNELS))
def test_every_lab_kernel_can_boot_systemd_and_apply_the_units_sandbox(name):
    assert lab_kernel.KERNELS[name].fragments[:2] == ("base.config", "systemd.config")  # one kernel for both boots
    text = (lab_kernel.CONFIG_DIR / "systemd.config").read_text()
    for option in ("FHANDLE", "INOTIFY_USER", "AUTOFS_FS", "TMPFS_POSIX_ACL", "CGROUPS", "MEMCG", "CGROUP_PIDS",
                   "SECCOMP_FILTER", "BPF_SYSCALL", "CGROUP_BPF", "UTS_NS"):
        assert f"CONFIG_{option}=y\n" in text


def test_the_7_kernel_adds_what_its_mock_iommu_depends_on():
    k = lab_kernel.KERNELS["7.3"]
    assert k.fragments == ("base.config", "systemd.config", "mock-iommu-7.config")
    text = (lab_kernel.CONFIG_DIR / "mock-iommu-7.config").read_text()
    for option in ("CONFIG_AMD_IOMMU=y", "CONFIG_IOMMU_PT=y", "CONFIG_IOMMU_PT_AMDV1=y"):
        assert option in text


def test_an_installed_source_is_under_usr_src_and_a_fetched_one_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lab_kernel.KERNELS["6.12"].tarball == lab_kernel.Path("/usr/src/linux-source-6.12.tar.xz")
    assert lab_kernel.KERNELS["7.3"].tarball == (
        tmp_path / "iopfd/lab/packages/linux-source-7.3_7.3.4-1~bpo13+1/usr/src/linux-source-7.3.tar.xz")


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """apt-get and dpkg stand-ins on PATH that log their arguments and do what the fetch expects of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "apt-get").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "apt-get $*" >> {log}
        case "$*" in
            *indextargets*) printf 'bookworm-security http://security.example/debian-security/\\n'
                            printf 'bookworm http://mirror.example/debian/\\n' ;;
            *" download "*) echo "sources: $(cat sources.list)" >> {log}
                            touch linux-source-7.3_7.3.4-1~bpo13+1_all.deb ;;
        esac
        """))
    (bin_dir / "dpkg").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "dpkg $*" >> {log}
        mkdir -p "$3/usr/src" && touch "$3/usr/src/linux-source-7.3.tar.xz"
        """))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(platform, "freedesktop_os_release", lambda: {"VERSION_CODENAME": "bookworm"})
    return log


def test_a_package_from_another_suite_is_downloaded_with_private_apt_state_and_unpacked(tmp_path, fake_apt):
    into = tmp_path / "packages" / "linux-source-7.3_7.3.4-1~bpo13+1"
    apt_dir = into.with_name(into.name + ".apt")
    system.unpack_from_suite("linux-source-7.3", "7.3.4-1~bpo13+1", "trixie-backports", into)
    assert (into / "usr/src/linux-source-7.3.tar.xz").exists()
    assert not apt_dir.exists() and not into.with_name(into.name + ".partial").exists()
    lines = fake_apt.read_text().splitlines()
    assert "sources: deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] " \
           "http://mirror.example/debian/ trixie-backports main" in lines
    calls = [shlex.split(line) for line in lines if not line.startswith("sources: ")]
    apt_calls = [c for c in calls if c[0] == "apt-get" and "indextargets" not in c]
    assert [c[-1] if c[-1] != "-q" else c[-2] for c in apt_calls] == ["update", "linux-source-7.3=7.3.4-1~bpo13+1"]
    for call in apt_calls:  # the machine's sources, lists and cache are never used
        assert f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}" in call
        assert "-oDir::Etc::SourceParts=-" in call
        assert f"-oDir::State::Lists={apt_dir / 'lists'}" in call
        assert f"-oDir::Cache={apt_dir / 'cache'}" in call
    assert ["dpkg", "-x", str(apt_dir / "linux-source-7.3_7.3.4-1~bpo13+1_all.deb"),
            str(into.with_name(into.name + ".partial"))] in calls


def test_a_failed_download_says_which_command_failed(tmp_path, fake_apt):
    (fake_apt.parent / "bin" / "apt-get").write_text("#!/bin/sh\ncase \"$*\" in *indextargets*) "
                                                     "echo 'bookworm http://mirror.example/debian/';; "
                                                     "*' download '*) echo 'E: Version not found' >&2; exit 100;; "
                                                     "esac\n")
    into = tmp_path / "pkg"
    with pytest.raises(LabError, match=r"'apt-get .* download linux-source-7.3=7.3.4-1~bpo13\+1' failed"):
        system.unpack_from_suite("linux-source-7.3", "7.3.4-1~bpo13+1", "trixie-backports", into)
    assert not into.exists()


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
    with pytest.raises(LabError, match=r"unknown lab kernel '5\.4'"):
        lab_kernel.ensure_built("5.4")
