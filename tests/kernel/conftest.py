"""Fixtures for tests that run inside the lab guest against the real iommufd."""

from __future__ import annotations

import textwrap

import pytest

from iopfd.iommufd import FaultQueue, Iommufd
from iopfd.iommufd.probe import YES, probe
from iopfd.iommufd.selftest import FaultingMockSetup
from iopfd_dev.bench.tools import Tools, build_tools


@pytest.fixture
def ctx():
    with Iommufd.open() as context:
        yield context


@pytest.fixture
def queue(ctx):
    with FaultQueue.alloc(ctx) as fault_queue:
        yield fault_queue


@pytest.fixture
def rig(ctx, queue):
    """A mock device on a nested HWPT whose faults go to ``queue``."""
    with FaultingMockSetup(ctx, queue.id) as setup:
        yield setup


@pytest.fixture(scope="session")
def bench_tools(request, tmp_path_factory) -> Tools:
    """The bench's C programs (the fault trigger, the C loops, the peer): as the host built them for
    this lab run, or compiled here."""
    spec = request.config.getoption("--lab-tools")
    return Tools.parse(spec) if spec else build_tools(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="session")
def features() -> dict[str, str]:
    """Feature name -> status, as ``iopfd probe`` finds them by trying each one. Tests that need a feature
    only some kernels have choose with ``require``/``require_not``, never by kernel version."""
    return {feature.name: feature.status for feature in probe()}


@pytest.fixture
def require(features):
    def check(name: str) -> None:
        if features[name] != YES:
            pytest.skip(f"this kernel lacks {name} (iopfd probe: {features[name]})")
    return check


@pytest.fixture
def require_not(features):
    def check(name: str) -> None:
        if features[name] == YES:
            pytest.skip(f"this kernel has {name}, so the behaviour without it cannot be seen here")
    return check


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory):
    """A third-party package providing broken policies through the ``iopfd.policies`` entry points."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "iopfd_lab_policies-1.0.dist-info").mkdir(parents=True)
    (root / "iopfd_lab_policies.py").write_text(textwrap.dedent("""
        import asyncio
        import time
        from iopfd.policies import Policy

        class Raising(Policy):
            def __init__(self, name):
                self.name = name
            async def decide(self, group):
                raise RuntimeError("a bug in a third-party policy")

        class Hanging(Policy):
            def __init__(self, name):
                self.name = name
            async def decide(self, group):
                await asyncio.sleep(3600)

        class Garbage(Policy):
            def __init__(self, name):
                self.name = name
            async def decide(self, group):
                return "yes"

        class Blocking(Policy):  # blocks the whole loop for 2 s on its first group: a sync call by mistake
            def __init__(self, name):
                self.name = name
                self.blocked = False
            async def decide(self, group):
                if not self.blocked:
                    self.blocked = True
                    time.sleep(2)
                return 0

        class Stalling(Policy):  # blocks the whole loop for an hour on any group: a hung sync call
            def __init__(self, name):
                self.name = name
            async def decide(self, group):
                time.sleep(3600)
                return 0
    """))
    (root / "iopfd_lab_policies-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: iopfd-lab-policies\nVersion: 1.0\n")
    (root / "iopfd_lab_policies-1.0.dist-info" / "entry_points.txt").write_text(
        "[iopfd.policies]\nlab-raise = iopfd_lab_policies:Raising\nlab-hang = iopfd_lab_policies:Hanging\n"
        "lab-garbage = iopfd_lab_policies:Garbage\nlab-block = iopfd_lab_policies:Blocking\n"
        "lab-stall = iopfd_lab_policies:Stalling\n")
    return str(root)
