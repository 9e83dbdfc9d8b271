"""Debian packages the lab needs: installed with apt when missing, or fetched from another suite and unpacked."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from iopfd_dev.lab.errors import LabError


def installed_version(package: str) -> str | None:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
        capture_output=True, text=True, check=False,
    )
    status, _, version = result.stdout.partition("\t")
    return version if result.returncode == 0 and status.endswith(" installed") else None


def ensure_packages(specs: list[str]) -> None:
    """Install the packages (``name`` or ``name=version``) that are not installed as asked."""
    missing = []
    for spec in specs:
        name, _, version = spec.partition("=")
        have = installed_version(name)
        if have is None or (version and have != version):
            missing.append(spec)
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError(f"the lab needs these Debian packages: {' '.join(missing)}; "
                       f"install them as root: apt-get install {' '.join(missing)}")
    print(f"[lab] installing {' '.join(missing)} with apt-get", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=600"]  # another apt (a second lab build, unattended upgrades) finishes first
    for argv in (["apt-get", *wait, "update", "-q"], ["apt-get", *wait, "install", "-y", "-q", *missing]):
        # apt's output goes to stderr: stdout is the result of commands like `iopfd-dev lab build`.
        if subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False).returncode != 0:
            raise LabError(f"'{' '.join(argv)}' failed; see its output above")


def _debian_mirror() -> str:
    """The Debian archive this machine's apt already uses for its own release."""
    codename = platform.freedesktop_os_release().get("VERSION_CODENAME", "")
    targets = subprocess.run(["apt-get", "indextargets", "--no-release-info", "--format", "$(RELEASE) $(REPO_URI)"],
                             capture_output=True, text=True, check=False).stdout.splitlines()
    for target in targets:
        release, _, uri = target.partition(" ")
        if release == codename:
            return uri
    raise LabError(f"no apt source for this machine's release {codename!r} to find the Debian archive from; "
                   "add the Debian archive for it to /etc/apt/sources.list.d/")


def unpack_from_suite(package: str, version: str, suite: str, into: Path) -> None:
    """Download ``package=version`` from ``suite`` of the Debian archive and unpack it into ``into`` (dpkg -x).

    Nothing is installed and the machine's apt sources stay as they are: apt gets a sources list,
    package lists and cache of its own, used for this one download.
    """
    apt_dir = into.with_name(into.name + ".apt")
    shutil.rmtree(apt_dir, ignore_errors=True)
    (apt_dir / "lists" / "partial").mkdir(parents=True)
    (apt_dir / "cache").mkdir()
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {_debian_mirror()} "
                       f"{suite} main\n")
    options = [f"-o{key}={value}" for key, value in (
        ("Dir::Etc::SourceList", sources), ("Dir::Etc::SourceParts", "-"), ("Dir::State::Lists", apt_dir / "lists"),
        ("Dir::Cache", apt_dir / "cache"),
        # apt's download user (_apt) cannot write into root's cache directory.
        ("APT::Sandbox::User", "root"),
    )]
    print(f"[lab] downloading {package} {version} from {suite} (apt-get download, sources used for this only)",
          file=sys.stderr, flush=True)
    for argv in (["apt-get", *options, "update", "-q"], ["apt-get", *options, "download", f"{package}={version}"]):
        if subprocess.run(argv, cwd=apt_dir, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False).returncode != 0:
            raise LabError(f"'{' '.join(argv)}' failed; see its output above")
    (deb,) = apt_dir.glob(f"{package}_*.deb")
    print(f"[lab] unpacking {deb.name} with dpkg -x", file=sys.stderr, flush=True)
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if subprocess.run(["dpkg", "-x", str(deb), str(partial)], stdin=subprocess.DEVNULL, check=False).returncode != 0:
        raise LabError(f"'dpkg -x {deb} {partial}' failed; see its output above")
    partial.rename(into)
    shutil.rmtree(apt_dir)
