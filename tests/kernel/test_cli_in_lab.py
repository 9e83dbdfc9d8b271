"""The command line inside the lab: probe sees the kernel's features, the demo answers every fault."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from iopfd.iommufd.probe import YES, probe

pytestmark = [pytest.mark.kernel, pytest.mark.guest]


def test_probe_finds_fault_queues_and_the_selftest_ops():
    features = {f.name: f for f in probe()}
    for name in ("iommufd", "fault queues", "selftest mock IOMMU", "I/O page faults end to end"):
        assert features[name].status == YES, features[name]


def test_iopfd_probe_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "iopfd", "probe"], capture_output=True, text=True, check=True).stdout
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()[1:]}
    assert " yes " in rows["fault queues"]
    assert " yes " in rows["selftest mock IOMMU"]


def test_demo_runs_the_daemon_and_every_fault_is_answered():
    result = subprocess.run([sys.executable, "-m", "iopfd", "demo", "--here", "--duration", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "daemon exited with 0" in result.stdout
    assert "nothing undelivered, no group left pending" in result.stdout
    triggered, answered = re.search(r"triggered (\d+) faults, the daemon answered (\d+) groups", result.stdout).groups()
    assert int(triggered) == int(answered) > 0
    assert re.search(r"\n\s+\d+s\s+\d+\s+\d+", result.stdout), "no live figures printed"
