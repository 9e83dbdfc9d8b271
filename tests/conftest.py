"""Runs kernel-lab tests where they belong.

On the host, every test marked ``guest`` is collected as usual and then stands in for its twins
inside the lab, one per lab kernel selected with ``--lab-kernel`` (default: every lab kernel), the
kernel in its id (``test_x[7.3]``). The first one of a kernel to run boots that kernel once and runs
all selected guest tests in it; each then reports the guest's outcome (with the guest's traceback on
failure) in the host's normal pytest summary. Tests marked ``systemd_guest`` do the same in a
second boot per kernel, the systemd boot (systemd as PID 1, iopfd's wheel installed for its units to
run). Host-side kernel tests that use the ``built`` fixture run once per selected kernel the same
way. Inside the guest (IOPFD_LAB_GUEST set) the same tests run for real and their results are
written to the file named by ``--lab-report``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from iopfd_dev.lab.guest import GUEST_ENV

IN_GUEST = bool(os.environ.get(GUEST_ENV))
GUEST_TIMEOUT = 3600  # seconds for one lab boot running the whole guest suite (build excluded)
# The two kinds of guest test, by marker: whether their boot has systemd as PID 1.
BOOTS = {"guest": False, "systemd_guest": True}
_RESULTS = pytest.StashKey[dict]()
_WHEEL_VENV = pytest.StashKey[Path]()


def pytest_addoption(parser: pytest.Parser) -> None:
    from iopfd_dev.lab.kernel import KERNELS

    group = parser.getgroup("iopfd kernel lab")
    group.addoption("--lab-kernel", action="append", choices=list(KERNELS),
                    help=f"run the kernel tests on this lab kernel; repeatable (default: all of {', '.join(KERNELS)})")
    group.addoption("--lab-report", default=None, help=argparse.SUPPRESS)
    group.addoption("--lab-venv", default=None, help=argparse.SUPPRESS)  # systemd boot: the wheel's venv, packed
    group.addoption("--lab-tools", default=None, help=argparse.SUPPRESS)  # the bench's C programs, built on the host


def lab_kernels(config: pytest.Config) -> list[str]:
    from iopfd_dev.lab.kernel import KERNELS

    return config.getoption("--lab-kernel") or list(KERNELS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: runs inside the lab guest (mark it kernel as well)")
    config.addinivalue_line("markers", "systemd_guest: runs inside the lab guest booted with systemd as PID 1 "
                                       "(mark it kernel as well)")
    if IN_GUEST and config.getoption("--lab-report"):
        config.pluginmanager.register(_GuestReporter(Path(config.getoption("--lab-report"))), "iopfd-lab-report")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "built" in metafunc.fixturenames:
        metafunc.parametrize("lab_kernel", lab_kernels(metafunc.config), scope="session")


@pytest.fixture(scope="session")
def built(request, lab_kernel):
    """The lab kernel's build artefacts, built first if needed (with its progress shown)."""
    from iopfd_dev.lab.kernel import ensure_built

    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return ensure_built(lab_kernel)


class _GuestReporter:
    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the whole session, one line per test)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        longrepr = str(report.longrepr) if report.longrepr else ""
        if report.skipped and isinstance(report.longrepr, tuple):
            longrepr = report.longrepr[2]
        self._file.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                     "longrepr": longrepr, "duration": report.duration}) + "\n")


# First, so that -k, -m and --deselect see the stand-ins with their kernel ids.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    kernels = lab_kernels(config)
    host_items: list[pytest.Item] = []
    for item in items:
        boots = [marker for marker in BOOTS if item.get_closest_marker(marker)]
        if len(boots) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(boots)}: a guest test runs in one boot")
        if boots:
            host_items += [LabItem.from_parent(item.parent, name=_with_kernel(item.name, kernel), original=item,
                                               kernel=kernel, systemd=BOOTS[boots[0]]) for kernel in kernels]
        else:
            host_items.append(item)
    items[:] = host_items


def _with_kernel(name: str, kernel: str) -> str:
    """``test_x`` -> ``test_x[7.3]``; ``test_x[a]`` -> ``test_x[a-7.3]``, as pytest names parameters."""
    return f"{name[:-1]}-{kernel}]" if name.endswith("]") else f"{name}[{kernel}]"


class LabTestFailure(Exception):
    pass


class LabItem(pytest.Item):
    """Host-side stand-in for one guest test: reports the outcome the lab run gave it."""

    def __init__(self, *, original: pytest.Item, kernel: str, systemd: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.own_markers = list(original.own_markers)
        self.add_marker(pytest.mark.timeout(0))  # the lab run has its own limit
        self.kernel = kernel
        self.systemd = systemd
        self.boot = f"{kernel}, systemd boot" if systemd else kernel
        self.guest_nodeid = original.nodeid

    def runtest(self) -> None:
        by_boot = self.session.stash.setdefault(_RESULTS, {})
        if (self.kernel, self.systemd) not in by_boot:
            by_boot[self.kernel, self.systemd] = _run_guest_suite(self.session, self.kernel, self.systemd)
        results = by_boot[self.kernel, self.systemd]
        if isinstance(results, Exception):
            raise LabTestFailure(f"the kernel lab ({self.boot}) failed, so this test could not run: {results}")
        phases = results.get(self.guest_nodeid)
        if not phases:
            raise LabTestFailure("the lab guest reported no result for this test (see the guest output above)")
        for phase in phases:
            if phase["outcome"] == "failed":
                raise LabTestFailure(f"failed in the lab guest ({self.boot}) during {phase['when']}:\n"
                                     f"{phase['longrepr']}")
        for phase in phases:
            if phase["outcome"] == "skipped":
                pytest.skip(f"skipped in the lab guest ({self.boot}): {phase['longrepr']}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, LabTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"[lab {self.boot}] {self.name}"


def _run_guest_suite(session: pytest.Session, kernel: str, systemd: bool) -> dict | Exception:
    from iopfd_dev.bench.tools import build_tools
    from iopfd_dev.lab import vm, wheel
    from iopfd_dev.lab.errors import LabError
    from iopfd_dev.lab.kernel import cache_root

    nodeids = [item.guest_nodeid for item in session.items
               if isinstance(item, LabItem) and item.kernel == kernel and item.systemd == systemd]
    shared = cache_root() / "runs" / f"pytest-{os.getpid()}-{kernel}{'-systemd' if systemd else ''}"
    shared.mkdir(parents=True, exist_ok=True)
    report = shared / "report.jsonl"
    report.unlink(missing_ok=True)
    # The bench's C programs are compiled here, once (seconds each in the guest), and cached by content.
    tools = build_tools(cache_root() / "bench")
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--color=no", "--durations=25",
            f"--lab-report={report}", f"--lab-kernel={kernel}", f"--lab-tools={tools.spec}",
            "--rootdir", str(session.config.rootpath), *nodeids]
    capture = session.config.pluginmanager.getplugin("capturemanager")
    writer = session.config.get_terminal_writer()
    try:
        with capture.global_and_fixture_disabled():
            if systemd:  # the units run iopfd as installed from its wheel (iopfd_dev/lab/wheel.py says why)
                if _WHEEL_VENV not in session.stash:  # once for every systemd boot of the session
                    venv = cache_root() / "runs" / f"pytest-{os.getpid()}-iopfd-venv.tar"
                    session.stash[_WHEEL_VENV] = wheel.install(venv)
                argv.append(f"--lab-venv={session.stash[_WHEEL_VENV]}")
            writer.line(f"\n[lab] running {len(nodeids)} kernel tests inside lab kernel {kernel}"
                        f"{' booted with systemd as PID 1' if systemd else ''}")
            vm.run(argv, kernel=kernel, timeout=GUEST_TIMEOUT, shared_dir=shared, systemd=systemd,
                   on_line=lambda line: writer.write("[guest] " + line, flush=True))
    except LabError as exc:
        return exc
    results: dict[str, list[dict]] = {}
    if report.exists():
        for line in report.read_text().splitlines():
            entry = json.loads(line)
            results.setdefault(entry["nodeid"], []).append(entry)
    shutil.rmtree(shared, ignore_errors=True)
    return results


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _WHEEL_VENV in session.stash:  # the venv the systemd boots' units ran iopfd from
        session.stash[_WHEEL_VENV].unlink(missing_ok=True)
