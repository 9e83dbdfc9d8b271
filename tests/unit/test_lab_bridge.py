"""The host side of the lab bridge: guest outcomes become host outcomes, and a broken lab fails loudly.

The lab itself is replaced by a fake ``vm.run`` that writes the report a guest would write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from iopfd_dev.bench.tools import Tools
from iopfd_dev.lab import vm, wheel
from iopfd_dev.lab.errors import LabError

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
SYSTEMD_GUEST_TESTS = """
import pytest
pytestmark = [pytest.mark.kernel, pytest.mark.systemd_guest]

def test_units_pass(): pass
def test_units_fail(): pass
"""


def fake_guest(calls: list):
    def run(argv, *, kernel, timeout, shared_dir, on_line, systemd=False):
        calls.append((kernel, argv) if not systemd else (f"{kernel} systemd", argv))
        report = Path(next(a for a in argv if a.startswith("--lab-report=")).split("=", 1)[1])
        entries = []
        for nodeid in (a for a in argv if "::" in a):
            name = nodeid.rsplit("::", 1)[1]
            if name == "test_missing":
                continue
            outcome = {"test_fails": "failed", "test_units_fail": "failed",
                       "test_skipped": "skipped"}.get(name, "passed")
            longrepr = {"failed": "AssertionError: the guest said no", "skipped": "no vEVENTQ"}.get(outcome, "")
            entries.append({"nodeid": nodeid, "when": "call", "outcome": outcome, "longrepr": longrepr, "duration": 0})
        report.write_text("".join(json.dumps(e) + "\n" for e in entries))
        on_line(f"guest output line from {kernel}\n")
        return 1
    return run


@pytest.fixture
def guest_boots(pytester, monkeypatch, tmp_path) -> list:
    """A pytester project with the bridge and GUEST_TESTS whose lab is fake_guest; the boots it made."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(vm, "run", fake_guest(calls))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_guest=GUEST_TESTS)
    return calls


def run_pytest(pytester, *args: str):
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio", *args)


def test_guest_outcomes_are_reported_on_the_host_once_per_lab_kernel(pytester, guest_boots):
    result = run_pytest(pytester, "-rA")
    result.assert_outcomes(passed=2, failed=4, skipped=2)
    assert [kernel for kernel, _ in guest_boots] == ["6.12", "7.3"]  # one boot per kernel for the whole session
    for kernel, argv in guest_boots:  # the guest runs the plain tests and knows its kernel
        assert f"--lab-kernel={kernel}" in argv
        (spec,) = [a.split("=", 1)[1] for a in argv if a.startswith("--lab-tools=")]  # built on the host
        assert all(os.access(program, os.X_OK) for program in Tools.parse(spec).spec.split(":"))
        assert [a.rsplit("::", 1)[1] for a in argv if "::" in a] == ["test_passes", "test_fails", "test_missing",
                                                                     "test_skipped"]
    result.stdout.fnmatch_lines([  # in the order pytest prints them
        "*[[]guest[]] guest output line from 6.12*",
        "*[[]guest[]] guest output line from 7.3*",
        "*test_fails[[]6.12[]]*", "failed in the lab guest (6.12) during call:", "*the guest said no",
        "*test_fails[[]7.3[]]*", "failed in the lab guest (7.3) during call:", "*the guest said no",
        "*test_missing[[]6.12[]]*", "*the lab guest reported no result for this test*",
        "*PASSED test_guest.py::test_passes[[]6.12[]]*",
        "*PASSED test_guest.py::test_passes[[]7.3[]]*",
        "*SKIPPED*skipped in the lab guest (6.12): no vEVENTQ*",
        "*SKIPPED*skipped in the lab guest (7.3): no vEVENTQ*",
    ])


def test_lab_kernel_selects_one_kernel_and_its_ids_filter(pytester, guest_boots):
    run_pytest(pytester, "--lab-kernel", "7.3").assert_outcomes(passed=1, failed=2, skipped=1)
    assert [kernel for kernel, _ in guest_boots] == ["7.3"]
    guest_boots.clear()
    run_pytest(pytester, "-k", "passes and 6.12").assert_outcomes(passed=1)
    assert [kernel for kernel, _ in guest_boots] == ["6.12"]


def test_a_lab_kernel_that_cannot_boot_fails_every_test_on_it_and_only_those(pytester, guest_boots, monkeypatch):
    working = vm.run

    def broken_7_3(argv, *, kernel, **kwargs):
        if kernel == "7.3":
            raise LabError("kernel build step failed (make bzImage, exit 2)")
        return working(argv, kernel=kernel, **kwargs)

    monkeypatch.setattr(vm, "run", broken_7_3)
    result = run_pytest(pytester)
    result.assert_outcomes(passed=1, failed=2 + 4, skipped=1)  # 6.12 as the guest said; every 7.3 test failed
    result.stdout.fnmatch_lines(["*the kernel lab (7.3) failed, so this test could not run: kernel build step failed*"])


def test_unit_tests_do_not_boot_the_lab(pytester, monkeypatch):
    monkeypatch.setattr(vm, "run", lambda *a, **k: pytest.fail("booted the lab"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_unit="def test_plain(): pass\n")
    run_pytest(pytester).assert_outcomes(passed=1)


@pytest.fixture
def wheel_installs(monkeypatch) -> list:
    """A fake wheel install; the archives it was asked for."""
    installs: list = []
    monkeypatch.setattr(wheel, "install", lambda archive: installs.append(archive) or archive)
    return installs


@pytest.fixture
def systemd_boots(guest_boots, wheel_installs, pytester) -> list:
    """guest_boots with SYSTEMD_GUEST_TESTS beside GUEST_TESTS."""
    pytester.makepyfile(test_units=SYSTEMD_GUEST_TESTS)
    return guest_boots


def test_systemd_guest_tests_run_in_a_systemd_boot_of_their_own_per_kernel(pytester, systemd_boots):
    result = run_pytest(pytester, "-rA", "--lab-kernel", "7.3")
    result.assert_outcomes(passed=2, failed=3, skipped=1)
    assert [kernel for kernel, _ in systemd_boots] == ["7.3", "7.3 systemd"]  # one boot of each kind
    plain, systemd = (argv for _, argv in systemd_boots)
    assert [a.rsplit("::", 1)[1] for a in plain if "::" in a] == ["test_passes", "test_fails", "test_missing",
                                                                   "test_skipped"]
    assert [a.rsplit("::", 1)[1] for a in systemd if "::" in a] == ["test_units_pass", "test_units_fail"]
    (venv,) = [a.split("=", 1)[1] for a in systemd if a.startswith("--lab-venv=")]  # the wheel's, for the units
    assert venv.endswith("-iopfd-venv.tar")
    assert not any(a.startswith("--lab-venv=") for a in plain)
    result.stdout.fnmatch_lines([
        "*running 2 kernel tests inside lab kernel 7.3 booted with systemd as PID 1*",
        "*test_units_fail[[]7.3[]]*", "failed in the lab guest (7.3, systemd boot) during call:", "*the guest said no",
        "*PASSED test_units.py::test_units_pass[[]7.3[]]*",
    ])


def test_the_wheel_is_installed_once_for_the_systemd_boots_of_every_kernel(pytester, systemd_boots, wheel_installs):
    run_pytest(pytester).assert_outcomes(passed=4, failed=6, skipped=2)
    assert [kernel for kernel, _ in systemd_boots] == ["6.12", "7.3", "6.12 systemd", "7.3 systemd"]
    assert len(wheel_installs) == 1


def test_a_systemd_boot_that_fails_fails_its_tests_and_only_those(pytester, systemd_boots, monkeypatch):
    working = vm.run

    def broken_systemd(argv, *, systemd=False, **kwargs):
        if systemd:
            raise LabError("lab guest exited without reporting the command's status")
        return working(argv, systemd=systemd, **kwargs)

    monkeypatch.setattr(vm, "run", broken_systemd)
    result = run_pytest(pytester, "--lab-kernel", "6.12")
    result.assert_outcomes(passed=1, failed=2 + 2, skipped=1)  # the normal boot as its guest said; both units tests
    result.stdout.fnmatch_lines(["*the kernel lab (6.12, systemd boot) failed, so this test could not run: lab guest*"])


def test_a_wheel_that_cannot_be_installed_fails_the_systemd_boots_tests(pytester, systemd_boots, monkeypatch):
    def no_uv(archive):
        raise LabError("uv is missing, and the systemd boot installs iopfd's wheel with it; ./dev installs uv")

    monkeypatch.setattr(wheel, "install", no_uv)
    result = run_pytest(pytester, "--lab-kernel", "6.12")
    result.assert_outcomes(passed=1, failed=2 + 2, skipped=1)
    result.stdout.fnmatch_lines(["*the kernel lab (6.12, systemd boot) failed*uv is missing*"])
    assert [kernel for kernel, _ in systemd_boots] == ["6.12"]  # no systemd boot without the wheel


def test_a_test_marked_for_both_boots_is_refused(pytester, guest_boots):
    pytester.makepyfile(test_both="import pytest\n@pytest.mark.guest\n@pytest.mark.systemd_guest\ndef test_x(): pass\n")
    result = run_pytest(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_both.py::test_x is marked guest and systemd_guest: "
                                 "a guest test runs in one boot"])
