"""Build and cache the lab kernels: Debian kernel source + tinyconfig + our fragments.

A built kernel is cached under ``$XDG_CACHE_HOME/iopfd/lab/<key>/`` where the key hashes the
source package version, the fragment files and this module's recipe version, so a change to any
of them builds anew and an unchanged tree is reused in seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from iopfd.iommufd import probe
from iopfd_dev.lab import system
from iopfd_dev.lab.errors import LabError

CONFIG_DIR = Path(__file__).with_name("configs")
# Bump when the build steps change in a way that changes the artefacts.
RECIPE_VERSION = "2"
# Build tools the kernel's own Makefiles need on a fresh Debian machine.
BUILD_PACKAGES = ("build-essential", "flex", "bison", "bc", "libelf-dev", "cpio", "xz-utils", "kmod")


@dataclass(frozen=True)
class LabKernel:
    """One kernel the lab can build: which Debian source package, and which fragments."""

    name: str
    package: str
    package_version: str
    fragments: tuple[str, ...]
    # None: installed with apt from the machine's own sources. A suite name (of a newer Debian release):
    # downloaded from that suite into the cache and unpacked there, nothing installed.
    suite: str | None = None
    # What `iopfd probe` finds on this kernel. A lab test holds the probe to it, so that tests choosing
    # by probing a feature are sure to run where the lab has it.
    features: frozenset[str] = frozenset()
    # Options the lab cannot work without; checked in the final .config.
    required: tuple[str, ...] = ("CONFIG_IOMMUFD", "CONFIG_IOMMUFD_TEST", "CONFIG_IOMMU_IOPF")

    @property
    def package_root(self) -> Path:
        """Where the source package's files are: / when installed, its cache directory when unpacked."""
        if self.suite is None:
            return Path("/")
        return cache_root() / "packages" / f"{self.package}_{self.package_version}"

    @property
    def tarball(self) -> Path:
        return self.package_root / "usr" / "src" / f"{self.package}.tar.xz"


FAULT_PATH = frozenset({probe.IOMMUFD, probe.FAULT_QUEUES, probe.MOCK_IOMMU, probe.FAULTS_END_TO_END})
KERNELS: dict[str, LabKernel] = {
    "6.12": LabKernel(
        name="6.12",
        package="linux-source-6.12",
        package_version="6.12.117-1~deb12u1",
        fragments=("base.config", "systemd.config"),
        features=FAULT_PATH,
    ),
    "7.3": LabKernel(
        name="7.3",
        package="linux-source-7.3",
        package_version="7.3.4-1~bpo13+1",
        fragments=("base.config", "systemd.config", "mock-iommu-7.config"),
        suite="trixie-backports",
        features=FAULT_PATH | {probe.PAGING_HWPT_FAULTS, probe.PASID_ATTACH, probe.VIOMMU, probe.VEVENTQ},
    ),
}
DEFAULT_KERNEL = "6.12"


@dataclass(frozen=True)
class BuiltKernel:
    """The cached artefacts of one lab kernel."""

    kernel: LabKernel
    directory: Path

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def headers(self) -> Path:
        """``make headers_install`` output: ``include/linux/iommufd.h`` and friends."""
        return self.directory / "headers" / "include"

    @property
    def selftest_header(self) -> Path:
        """``drivers/iommu/iommufd/iommufd_test.h``, which headers_install does not export."""
        return self.directory / "iommufd_test.h"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def build_seconds(self) -> float:
        return float((self.directory / "build-seconds").read_text())


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iopfd" / "lab"


def cache_key(kernel: LabKernel) -> str:
    digest = hashlib.sha256()
    digest.update(f"{kernel.package}={kernel.package_version};recipe={RECIPE_VERSION}".encode())
    for fragment in kernel.fragments:
        digest.update(fragment.encode() + b"\0" + (CONFIG_DIR / fragment).read_bytes())
    return f"linux-{kernel.package_version}-{digest.hexdigest()[:12]}"


def _log(message: str) -> None:
    print(f"[lab] {message}", file=sys.stderr, flush=True)


def ensure_built(name: str = DEFAULT_KERNEL) -> BuiltKernel:
    """Return the cached build of lab kernel ``name``, building it first if needed."""
    try:
        kernel = KERNELS[name]
    except KeyError:
        raise LabError(f"unknown lab kernel {name!r}; known: {', '.join(KERNELS)}") from None
    directory = cache_root() / cache_key(kernel)
    built = BuiltKernel(kernel, directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / "DONE").exists():
            return built
        _build(kernel, directory)
    return built


def _fetch_source(kernel: LabKernel) -> None:
    if kernel.suite is not None:
        system.ensure_packages(list(BUILD_PACKAGES))
        if not kernel.package_root.exists():
            system.unpack_from_suite(kernel.package, kernel.package_version, kernel.suite, kernel.package_root)
        return
    system.ensure_packages([*BUILD_PACKAGES, f"{kernel.package}={kernel.package_version}"])
    if system.installed_version(kernel.package) != kernel.package_version:
        raise LabError(
            f"{kernel.package} {system.installed_version(kernel.package)} is installed but the lab "
            f"needs {kernel.package_version}; run: apt-get install {kernel.package}={kernel.package_version}"
        )


def _build(kernel: LabKernel, directory: Path) -> None:
    _fetch_source(kernel)
    if directory.exists():
        shutil.rmtree(directory)
    work = directory / "work"
    work.mkdir(parents=True)
    log_path = directory / "build.log"
    started = time.monotonic()
    _log(f"building lab kernel {kernel.name} ({kernel.package} {kernel.package_version}) in {directory}")
    _log(f"full build log: {log_path}")

    _log(f"unpacking {kernel.tarball}")
    with tarfile.open(kernel.tarball) as archive:
        archive.extractall(work, filter="tar")
    (source,) = [p for p in work.iterdir() if p.is_dir()]

    with open(log_path, "w") as log:
        def run(*argv: str, progress: str | None = None) -> None:
            _run_logged(list(argv), source, log, log_path, progress)

        run("make", "tinyconfig")
        # virtme-ng's options first, then the fragments: where they differ (virtme-configkernel turns
        # AUTOFS_FS off, systemd.config needs it), the lab's fragments win.
        run(str(Path(sys.executable).with_name("virtme-configkernel")), "--update")
        fragments = [str(CONFIG_DIR / f) for f in kernel.fragments]
        run("scripts/kconfig/merge_config.sh", "-m", ".config", *fragments)
        run("make", "olddefconfig")
        _check_config(kernel, source / ".config", fragments)
        run("make", f"-j{os.cpu_count() or 1}", "bzImage", progress="compiling")
        run("make", f"INSTALL_HDR_PATH={directory / 'headers'}", "headers_install")

    shutil.copy(source / "arch/x86/boot/bzImage", directory / "bzImage")
    shutil.copy(source / ".config", directory / "config")
    shutil.copy(source / "drivers/iommu/iommufd/iommufd_test.h", directory / "iommufd_test.h")
    shutil.rmtree(work)
    seconds = time.monotonic() - started
    (directory / "build-seconds").write_text(f"{seconds:.0f}\n")
    (directory / "DONE").write_text(f"{kernel.package} {kernel.package_version}\n")
    _log(f"lab kernel {kernel.name} built in {seconds / 60:.1f} min")


def _run_logged(argv: list[str], cwd: Path, log, log_path: Path, progress: str | None) -> None:
    """Run one build step, its output to the log; show a progress line every few seconds."""
    _log(" ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv)))
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    compiled = 0
    step_started = last_report = time.monotonic()
    for line in proc.stdout:
        log.write(line)
        if progress and line.lstrip().startswith(("CC ", "AS ", "LD ", "AR ")):
            compiled += 1
        now = time.monotonic()
        if progress and now - last_report >= 15:
            _log(f"  {progress}: {compiled} objects done, {now - step_started:.0f} s")
            last_report = now
    if proc.wait() != 0:
        log.flush()
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise LabError(f"kernel build step failed ({' '.join(argv)}, exit {proc.returncode}); "
                       f"last lines of {log_path}:\n{tail}")


def _check_config(kernel: LabKernel, config: Path, fragments: list[str]) -> None:
    """Every option the fragments ask for, and the lab's required ones, must survive olddefconfig."""
    final = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", config.read_text(), re.M))
    wanted = {name: "y" for name in kernel.required}
    for fragment in fragments:
        wanted.update(re.findall(r"^(CONFIG_\w+)=(.*)$", Path(fragment).read_text(), re.M))
    missing = {name: value for name, value in wanted.items() if final.get(name) != value}
    if missing:
        listing = ", ".join(f"{n}={v} (got {final.get(n, 'unset')})" for n, v in sorted(missing.items()))
        raise LabError(f"lab kernel config lost options the lab needs: {listing}; "
                       "check their Kconfig dependencies and add them to the fragment")
