"""systemd/iopfd.service and iopfd.socket pass ``systemd-analyze verify`` and keep their hardening."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "systemd"
# From Debian's systemd package; `./dev test` installs it when missing.
ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def units(tmp_path):
    """The units with ExecStart pointing at this checkout's iopfd (verify checks the binary exists)."""
    iopfd = Path(sys.executable).parent / "iopfd"
    service = (UNITS / "iopfd.service").read_text().replace("/usr/local/bin/iopfd", str(iopfd))
    (tmp_path / "iopfd.service").write_text(service)
    shutil.copy(UNITS / "iopfd.socket", tmp_path)
    return tmp_path


def test_systemd_analyze_verify_passes(units):
    assert ANALYZE, "systemd-analyze is missing: apt-get install systemd"
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(units / "iopfd.service"), str(units / "iopfd.socket")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_security_exposure_stays_low(units):
    result = subprocess.run([ANALYZE, "security", "--offline=true", str(units / "iopfd.service")],
                            capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for iopfd.service: ([\d.]+)", result.stdout).group(1))
    assert score <= 2.0, result.stdout  # 1.7 when written; docs/operations.md reports it


def test_the_service_has_what_the_daemon_relies_on():
    service = (UNITS / "iopfd.service").read_text()
    for line in ("Type=notify", "RestartPreventExitStatus=78", "DeviceAllow=/dev/iommu rw",
                 "DeviceAllow=char-vfio-dev rw", "RuntimeDirectory=iopfd/state", "DevicePolicy=closed",
                 "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6", "SystemCallFilter=@system-service"):
        assert f"\n{line}\n" in service, line
    assert re.search(r"\nWatchdogSec=\d+s\n", service) and re.search(r"\nFileDescriptorStoreMax=[1-9]\d*\n", service)
    socket_unit = (UNITS / "iopfd.socket").read_text()
    assert "\nListenSequentialPacket=/run/iopfd/control.sock\n" in socket_unit
    assert "\nFileDescriptorName=control\n" in socket_unit  # what open_control_socket looks for
