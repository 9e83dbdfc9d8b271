"""Fixtures for tests that run inside the lab guest against the real iommufd."""

from __future__ import annotations

import pytest

from iopfd.iommufd import FaultingMockSetup, FaultQueue, Iommufd


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
