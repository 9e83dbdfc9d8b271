"""This checkout installed as an operator installs iopfd: its wheel in a venv of Debian's Python.

The systemd boot of the lab runs iopfd.service as shipped, and its sandbox (ProtectHome=, PrivateTmp=)
hides the checkout's own venv, whose Python may live under /root or /home. So the wheel goes into a
venv of its own, with the locked dependencies from uv's cache (no network). The venv is relocatable:
it is made on the host and unpacked in the guest at another path. It travels as one tar archive: the
guest unpacks that on its tmpfs in seconds, where copying the venv's 3000 files over 9p took minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import iopfd
from iopfd_dev.lab.errors import LabError

# The interpreter docs/operations.md installs iopfd with: Debian's, where every sandboxed service sees it.
SYSTEM_PYTHON = "/usr/bin/python3"


def install(archive: Path) -> Path:
    """Build this checkout's wheel, install it with its locked dependencies into a new venv and pack that
    as the tar ``archive`` (unpacked, ``bin/iopfd`` is the wheel's iopfd); returns ``archive``."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if not uv:
        raise LabError("uv is missing, and the systemd boot installs iopfd's wheel with it; ./dev installs uv")
    if not Path(SYSTEM_PYTHON).exists():
        raise LabError(f"{SYSTEM_PYTHON} is missing; the systemd boot installs iopfd on Debian's Python as "
                       "docs/operations.md does: apt-get install python3")
    checkout = Path(iopfd.__file__).resolve().parents[1]
    work = archive.with_name(archive.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    venv = work / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    pylock = work / "pylock.toml"
    steps = (
        [uv, "build", "--package", "iopfd", "--wheel", "--offline", "--quiet", "--out-dir", str(work)],
        [uv, "export", "--package", "iopfd", "--frozen", "--no-dev", "--no-emit-project", "--format", "pylock.toml",
         "--quiet", "-o", str(pylock)],
        [uv, "venv", "--offline", "--relocatable", "--quiet", "--python", SYSTEM_PYTHON, str(venv)],
    )
    for argv in steps:
        _run(argv, checkout, env)
    (wheel,) = work.glob("iopfd-*.whl")
    # Compiled now: the service cannot write bytecode (ProtectSystem=strict), and compiling every module at
    # each start under TCG takes minutes of the start-up.
    pip_install = [uv, "pip", "install", "--offline", "--quiet", "--compile-bytecode",
                   "--python", str(venv / "bin" / "python")]
    for what in (["-r", str(pylock)], [str(wheel)]):  # a pylock.toml takes no other requirement beside it
        _run([*pip_install, *what], checkout, env)
    _run(["tar", "-cf", str(archive), "-C", str(venv), "."], checkout, env)
    shutil.rmtree(work)
    return archive


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            check=False)
    if result.returncode != 0:
        raise LabError(f"installing iopfd's wheel for the systemd boot failed: '{' '.join(argv)}' exited with "
                       f"{result.returncode}:\n{result.stderr.strip()}")
