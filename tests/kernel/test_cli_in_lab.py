"""The command line inside the lab: probe sees the kernel's features, the demo answers every fault."""

from __future__ import annotations

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


def test_demo_answers_every_triggered_fault():
    result = subprocess.run([sys.executable, "-m", "iopfd", "demo", "--here", "--faults", "300"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "read and answered 300 groups" in result.stdout
    assert "has no undelivered groups" in result.stdout
