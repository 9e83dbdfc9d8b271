"""Debian packages the lab needs, installed with apt when missing."""

from __future__ import annotations

import os
import subprocess
import sys

from iopfd.lab.errors import LabError


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
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        if subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=False).returncode != 0:
            raise LabError(f"'{' '.join(argv)}' failed; see its output above")
