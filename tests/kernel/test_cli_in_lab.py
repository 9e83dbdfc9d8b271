"""The command line inside the lab: probe sees the kernel's features, the demo answers every fault."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from iopfd.iommufd.probe import FAULT_QUEUES, MOCK_IOMMU, YES, probe
from iopfd_dev.lab.kernel import KERNELS

pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]  # the demo starts a daemon


def test_probe_finds_exactly_what_this_lab_kernel_offers(request):
    """Tests that need a feature choose by probing it; this keeps them from skipping where it is there."""
    names = request.config.getoption("--lab-kernel") or []
    assert len(names) == 1, "the lab bridge names the kernel it booted with --lab-kernel"
    found = {f.name: f for f in probe()}
    assert {name for name, f in found.items() if f.status == YES} == KERNELS[names[0]].features, found


def test_iopfd_probe_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "iopfd", "probe"], capture_output=True, text=True, check=True).stdout
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()[1:]}
    assert " yes " in rows[FAULT_QUEUES]
    assert " yes " in rows[MOCK_IOMMU]


def test_demo_runs_the_daemon_and_every_fault_is_answered():
    result = subprocess.run([sys.executable, "-m", "iopfd_dev", "demo", "--here", "--duration", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "daemon exited with 0" in result.stdout
    assert "nothing undelivered, no group left pending" in result.stdout
    triggered, answered = re.search(r"triggered (\d+) faults, the daemon answered (\d+) groups", result.stdout).groups()
    assert int(triggered) == int(answered) > 0
    assert re.search(r"\n\s+\d+s\s+\d+\s+\d+", result.stdout), "no live figures printed"
