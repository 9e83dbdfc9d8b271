"""The systemd boot's arguments and script, without booting (the lab tests boot it)."""

from __future__ import annotations

import os
import shlex
import sys

import pytest

from iopfd_dev.lab import vm
from iopfd_dev.lab.errors import LabError


def test_the_systemd_boot_runs_the_command_as_kernel_command_line_service(tmp_path):
    script, shared, cwd = tmp_path / "guest-command.sh", tmp_path / "shared", tmp_path / "checkout"
    argv = vm._systemd_boot(script, shared, cwd, "python -m iopfd_dev.lab.guest STATUS -- pytest")
    assert argv[0] == "--systemd" and argv[argv.index("--exec") + 1] == "true"
    kernel_args = shlex.split(argv[argv.index("--append") + 1])
    # PID 1 is told it is no container (/.dockerenv in the shared root); the generators get systemd.run=
    assert "container=" in kernel_args
    assert vm.ROOT_FLAGS in kernel_args  # the cached 9p root, as in the normal boot
    (generators,) = [a.split("=", 2)[2] for a in kernel_args if a.startswith("systemd.setenv=SYSTEMD_PROC_CMDLINE=")]
    assert generators.split() == [f"systemd.run={script}", "systemd.mask=systemd-timesyncd.service",
                                  "systemd.mask=systemd-tmpfiles-setup.service"]
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/sh" and "set -e" in lines
    mounts = [line for line in lines if line.startswith("mount ")]
    assert mounts[-1].endswith(f" virtme.initmount0 {shared}")  # vng --rwdir's 9p tag, after the tmpfs on /tmp
    assert {"mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /var/tmp"} <= set(mounts)
    assert lines[-2:] == [f"cd {cwd}", "exec python -m iopfd_dev.lab.guest STATUS -- pytest"]


def test_a_script_path_the_kernel_command_line_cannot_carry_is_refused(tmp_path):
    with pytest.raises(LabError, match="cannot carry spaces or quotes; set XDG_CACHE_HOME"):
        vm._systemd_boot(tmp_path / "a b" / "guest-command.sh", tmp_path, tmp_path, sys.executable)
