"""The host side of the lab bridge: guest outcomes become host outcomes, and a broken lab fails loudly.

The lab itself is replaced by a fake ``vm.run`` that writes the report a guest would write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iopfd.lab import vm
from iopfd.lab.errors import LabError

pytest_plugins = ["pytester"]
CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()
GUEST_TESTS = """
import pytest
pytestmark = [pytest.mark.kernel, pytest.mark.guest]

def test_passes(): pass
def test_fails(): pass
def test_missing(): pass
def test_skipped(): pass
"""


def fake_guest(calls: list):
    def run(argv, *, kernel, timeout, shared_dir, on_line):
        calls.append(argv)
        report = Path(next(a for a in argv if a.startswith("--lab-report=")).split("=", 1)[1])
        entries = []
        for nodeid in (a for a in argv if "::" in a):
            name = nodeid.rsplit("::", 1)[1]
            if name == "test_missing":
                continue
            outcome = {"test_fails": "failed", "test_skipped": "skipped"}.get(name, "passed")
            longrepr = {"failed": "AssertionError: the guest said no", "skipped": "no vEVENTQ"}.get(outcome, "")
            entries.append({"nodeid": nodeid, "when": "call", "outcome": outcome, "longrepr": longrepr, "duration": 0})
        report.write_text("".join(json.dumps(e) + "\n" for e in entries))
        on_line("guest output line\n")
        return 1
    return run


def test_guest_outcomes_are_reported_on_the_host(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(vm, "run", fake_guest(calls))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_guest=GUEST_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio", "-rA")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    assert len(calls) == 1  # one boot for the whole session
    result.stdout.fnmatch_lines([  # in the order pytest prints them
        "*[[]guest[]] guest output line*",
        "*the guest said no*",
        "*the lab guest reported no result for this test*",
        "*skipped in the lab guest: no vEVENTQ*",
    ])


def test_a_lab_that_cannot_boot_fails_every_kernel_test(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def broken(*args, **kwargs):
        raise LabError("kernel build step failed (make bzImage, exit 2)")

    monkeypatch.setattr(vm, "run", broken)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_guest=GUEST_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*the kernel lab failed, so this test could not run: kernel build step failed*"])


def test_unit_tests_do_not_boot_the_lab(pytester, monkeypatch):
    monkeypatch.setattr(vm, "run", lambda *a, **k: pytest.fail("booted the lab"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_unit="def test_plain(): pass\n")
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio").assert_outcomes(passed=1)
