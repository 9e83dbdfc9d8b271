"""Demand paging with the ``ioas-map`` policy: a fault on a paging HWPT maps its page from a memfd into
the IOAS, and the selftest's access path then reads the memfd's bytes at that IOVA (Linux 6.13+)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest

from iopfd.client import Client
from iopfd.iommufd import INVALID, PERM_READ, PERM_WRITE, SUCCESS, FaultQueue, Hwpt, Ioas, Iommufd, IommufdError
from iopfd.iommufd.probe import PAGING_HWPT_FAULTS
from iopfd.iommufd.selftest import MockAccess, MockDevice
from iopfd.policies import IoasMapPolicy
from iopfd.policies.ioas_map import IoasMapOptions
from iopfd.protocol import ProtocolError
from test_control_in_lab import sidecar, wait_answered  # noqa: F401  (sidecar is a fixture)

# The sidecar is forked (test_control_in_lab's fixture).
pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]

PAGE = 4096
WINDOW = 0x1000000  # the mock aperture starts here
PAGES = 16


@pytest.fixture
def memfd():
    """A memfd of PAGES + 1 pages, page i filled with byte i; the policy opens it as /proc/PID/fd/N."""
    fd = os.memfd_create("iopfd-backing")
    os.write(fd, b"".join(bytes([i]) * PAGE for i in range(PAGES + 1)))
    yield fd
    os.close(fd)


def backing_path(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


@contextlib.contextmanager
def paging_rig(ctx: Iommufd, fault_id: int):
    """IOAS -> mock device -> paging HWPT with the fault queue on that IOAS -> the device replaced onto it."""
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device, \
            Hwpt.alloc(ctx, dev_id=device.dev_id, pt_id=ioas.id, fault_id=fault_id) as paging:
        device.replace(paging.id)
        try:
            yield ioas, device
        finally:
            device.replace(ioas.id)


def test_ioas_map_maps_the_faulting_page_from_the_backing(ctx, queue, memfd, require):
    require(PAGING_HWPT_FAULTS)
    with paging_rig(ctx, queue.id) as (ioas, device):
        policy = IoasMapPolicy("demand", IoasMapOptions(ioas_id=ioas.id, iova=WINDOW, length=PAGES * PAGE,
                                                        backing=backing_path(memfd), backing_offset=PAGE))
        policy.bind("", ctx)  # groups read straight from the fd carry no queue name
        device.trigger_iopf(addr=WINDOW + 3 * PAGE + 0x10, grpid=1, perm=PERM_READ | PERM_WRITE)
        device.trigger_iopf(addr=WINDOW + PAGES * PAGE, grpid=2)  # the first page past the window
        device.trigger_iopf(addr=WINDOW + 3 * PAGE + 0x800, grpid=3)  # the same page again
        groups = queue.read()
        codes = [asyncio.run(policy.decide(group)) for group in groups]
        assert codes == [SUCCESS, INVALID, SUCCESS]
        answers = [(group.cookie, code) for group, code in zip(groups, codes)]
        assert queue.respond(answers) == 3
        assert all(queue.respond([answer]) == 0 for answer in answers)  # the kernel took each answer
        assert policy.counts == {"mapped": 1, "already_mapped": 1, "outside_window": 1}

        with MockAccess.create(ctx, ioas.id) as access:
            # Window page 3 is backing page 4 (backing_offset is one page).
            assert access.read(WINDOW + 3 * PAGE, PAGE) == bytes([4]) * PAGE
            access.write(WINDOW + 3 * PAGE, b"device wrote this")  # MAP_SHARED, WRITEABLE: into the memfd
            assert os.pread(memfd, 17, 4 * PAGE) == b"device wrote this"
            for unmapped in (WINDOW + 2 * PAGE, WINDOW + PAGES * PAGE):
                with pytest.raises(IommufdError, match="not \\(all\\) mapped"):
                    access.read(unmapped, 8)


def test_the_daemon_serves_a_brokered_queue_with_ioas_map(sidecar, memfd, require):  # noqa: F811
    require(PAGING_HWPT_FAULTS)
    # In the iommufd iopfd brokers the fault object is ID 1, so the peer's first IOAS is ID 2.
    iopfd, path = sidecar(f"""
        [policies.demand]
        type = "ioas-map"
        ioas_id = 2
        iova = {WINDOW:#x}
        length = {PAGES * PAGE:#x}
        backing = "{backing_path(memfd)}"
    """)
    with Client(path) as client:
        iommufd_fd, fault_id = client.broker("vm1", policy="demand")
        with Iommufd(iommufd_fd) as ctx, paging_rig(ctx, fault_id) as (ioas, device):
            assert ioas.id == 2
            device.trigger_iopf(addr=WINDOW + 5 * PAGE, grpid=1, perm=PERM_WRITE)
            device.trigger_iopf(addr=WINDOW - PAGE, grpid=2)
            totals = wait_answered(client, 2)
            with MockAccess.create(ctx, ioas.id) as access:
                assert access.read(WINDOW + 5 * PAGE, PAGE) == bytes([5]) * PAGE
            reply = client.detach("vm1")
        # A queue handed over as a bare fault fd has no iommufd iopfd could map into.
        with Iommufd.open() as own, FaultQueue.alloc(own) as bare, pytest.raises(ProtocolError) as info:
            client.attach(bare.fd, "vm2", policy="demand")
    assert (totals["success"], totals["invalid"]) == (1, 1) and reply["outcomes"]["success"] == 1
    assert info.value.code == "policy-cannot-serve" and "broker" in info.value.message
    assert iopfd.terminate() == 0


def test_ioas_map_is_refused_at_start_where_paging_hwpts_deliver_no_faults(tmp_path, memfd, require_not):
    require_not(PAGING_HWPT_FAULTS)
    config = tmp_path / "iopfd.toml"
    config.write_text(textwrap.dedent(f"""
        [policies.demand]
        type = "ioas-map"
        ioas_id = 2
        iova = {WINDOW:#x}
        length = {PAGE:#x}
        backing = "{backing_path(memfd)}"
    """))
    result = subprocess.run([sys.executable, "-m", "iopfd", "check-config", str(config)], capture_output=True,
                            text=True)
    assert result.returncode == 78, result
    assert "policies.demand: this kernel does not deliver faults from paging HWPTs" in result.stderr + result.stdout
    assert "Linux 6.13+" in result.stderr + result.stdout
