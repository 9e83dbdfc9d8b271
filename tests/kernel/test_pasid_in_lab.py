"""Faults at PASIDs (Linux 7.x selftest PASID ops): fault-capable HWPTs attached at PASIDs of a
PASID-capable mock device, faults carrying PASID_VALID and the pasid, the kernel routing them by
PASID (falling back to the RID's nested HWPT, as the mock has a user PASID table), and the daemon's
``rules`` deciding by pasid with metrics that do not grow with the number of PASIDs."""

from __future__ import annotations

import re
import textwrap
import urllib.request

import pytest

from iopfd.iommufd import PASID_VALID, SUCCESS, FaultQueue, Hwpt, Ioas, Iommufd, lib
from iopfd.iommufd.context import Object
from iopfd.iommufd.probe import PASID_ATTACH
from iopfd.iommufd.selftest import SELFTEST_NESTED_DATA, MockDevice
from iopfd_dev.daemon import DaemonProcess
from test_daemon import assert_kernel_has_nothing_pending

# The daemon is forked (iopfd_dev.forked: the same `iopfd run` without its start-up imports, which take
# 5-15 s in the TCG guest).
pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]

METRICS_PORT = 9781


class PasidRig:
    """A PASID-capable mock device whose RID is on a nested, PASID-compatible HWPT with a fault queue
    (the kernel refuses PASID attaches while the RID's HWPT is not PASID-compatible)."""

    def __init__(self, ctx: Iommufd, rid_fault_id: int) -> None:
        self.ctx = ctx
        self._stack: list[Object] = []
        self.attached: set[int] = set()
        self.ioas = self._keep(Ioas.alloc(ctx))
        self.device = self._keep(MockDevice.create(ctx, self.ioas.id, flags=lib.MOCK_FLAGS_DEVICE_PASID))
        self.parent = self._keep(Hwpt.nest_parent(ctx, dev_id=self.device.dev_id, ioas_id=self.ioas.id))
        self.rid_hwpt = self.nested(rid_fault_id)
        self.device.replace(self.rid_hwpt.id)

    def _keep(self, obj):
        self._stack.append(obj)
        return obj

    def nested(self, fault_id: int) -> Hwpt:
        return self._keep(Hwpt.alloc(self.ctx, dev_id=self.device.dev_id, pt_id=self.parent.id,
                                     flags=lib.IOMMU_HWPT_ALLOC_PASID, data_type=lib.IOMMU_HWPT_DATA_SELFTEST,
                                     data=SELFTEST_NESTED_DATA, fault_id=fault_id))

    def paging(self, fault_id: int) -> Hwpt:
        return self._keep(Hwpt.alloc(self.ctx, dev_id=self.device.dev_id, pt_id=self.ioas.id,
                                     flags=lib.IOMMU_HWPT_ALLOC_PASID, fault_id=fault_id))

    def attach(self, pasid: int, hwpt: Hwpt) -> None:
        assert self.device.pasid_attach(pasid, hwpt.id) == hwpt.id
        self.attached.add(pasid)

    def detach(self, pasid: int) -> None:
        self.device.pasid_detach(pasid)
        self.attached.discard(pasid)

    def close(self) -> None:
        for pasid in sorted(self.attached):
            self.detach(pasid)
        self.device.replace(self.ioas.id)
        while self._stack:
            self._stack.pop().destroy()

    def __enter__(self) -> PasidRig:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_one(queue: FaultQueue):
    """The one group waiting on ``queue``, answered SUCCESS; the kernel must refuse a second answer."""
    (group,) = queue.read()
    assert queue.respond([(group.cookie, SUCCESS)]) == 1
    assert queue.respond([(group.cookie, SUCCESS)]) == 0
    return group


def test_faults_carry_their_pasid_to_the_hwpt_attached_there_or_fall_back_to_the_rid(ctx, require):
    require(PASID_ATTACH)
    with FaultQueue.alloc(ctx) as rid_queue, FaultQueue.alloc(ctx) as nested_queue, \
            FaultQueue.alloc(ctx) as paging_queue, PasidRig(ctx, rid_queue.id) as rig:
        nested_hwpt, paging_hwpt = rig.nested(nested_queue.id), rig.paging(paging_queue.id)
        rig.attach(100, nested_hwpt)  # a nested HWPT at a PASID
        rig.attach(200, paging_hwpt)  # a paging HWPT at a PASID
        assert rig.device.pasid_attached(100, nested_hwpt.id) and rig.device.pasid_attached(300, 0)

        def fault(pasid: int, queue: FaultQueue):
            rig.device.trigger_iopf(addr=0x100000 + pasid, pasid=pasid, grpid=pasid % 512)
            group = read_one(queue)
            (record,) = group.faults
            assert (group.dev_id, record.addr) == (rig.device.dev_id, 0x100000 + pasid)
            return group.pasid, bool(record.flags & PASID_VALID)

        assert fault(100, nested_queue) == (100, True)
        assert fault(200, paging_queue) == (200, True)
        assert fault(300, rid_queue) == (300, True)  # nothing at 300: the RID's nested HWPT takes it
        assert fault(0, rid_queue) == (None, False)  # no PASID
        for queue in (rid_queue, nested_queue, paging_queue):
            assert queue.read() == []

        rig.detach(100)
        assert rig.device.pasid_attached(100, 0)
        assert fault(100, rid_queue) == (100, True)

        rig.device.trigger_iopf(addr=0x200000, pasid=200, grpid=9)  # pending on the paging HWPT at 200 ...
        assert rig.device.pasid_replace(200, nested_hwpt.id) == nested_hwpt.id
        assert rig.device.pasid_attached(200, nested_hwpt.id)
        assert paging_queue.read() == []  # ... answered by the kernel when the replace moved pasid 200 away
        assert fault(200, nested_queue) == (200, True)


def metric_series(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("iopfd_"))}


def test_rules_decide_by_pasid_and_metrics_do_not_grow_with_pasids(tmp_path, ctx, queue, require):
    require(PASID_ATTACH)
    config = tmp_path / "iopfd.toml"
    config.write_text(textwrap.dedent("""
        policy = "by-pasid"
        [policies.by-pasid]
        type = "rules"
        default = "reject"
        [[policies.by-pasid.rules]]
        pasid = [100]
        policy = "reject"
        [[policies.by-pasid.rules]]
        pasid = [200, "none"]
        policy = "accept"
    """))
    iopfd = DaemonProcess(tmp_path, (queue.fd,), "--fault-fd", f"{queue.fd}:lab", "--config", str(config),
                          "--metrics-address", f"127.0.0.1:{METRICS_PORT}",
                          env={"IOPFD_CONTROL__PATH": "off", "IOPFD_WATCH_DEVICES": "false"}, forked=True)
    try:
        with PasidRig(ctx, queue.id) as rig:  # every HWPT delivers to the one queue the daemon serves
            rig.attach(100, rig.nested(queue.id))
            rig.attach(200, rig.paging(queue.id))
            iopfd.wait_ready()
            for i in range(40):
                for pasid in (100, 200, 0):
                    rig.device.trigger_iopf(addr=0x100000 + i * 0x1000, pasid=pasid, grpid=i)
            iopfd.wait_answered(120)
            before = metric_series(METRICS_PORT)
            for pasid in range(300, 332):  # 32 more PASIDs, through the RID's HWPT: the rules' default
                rig.device.trigger_iopf(addr=0x200000, pasid=pasid, grpid=pasid % 512)
            iopfd.wait_answered(152)
            after = metric_series(METRICS_PORT)
            assert iopfd.terminate() == 0
            totals = iopfd.totals()
    finally:
        iopfd.close()
    assert (totals["success"], totals["invalid"]) == (80, 72)  # 200 and no PASID; 100 and the 32 others
    assert_kernel_has_nothing_pending(queue, 152)
    assert after.keys() == before.keys()  # no series per PASID
    labels = {name for series in after for name in re.findall(r'(\w+)="', series)}
    assert not labels & {"pasid", "addr", "address", "dev_id", "grpid"}, labels
    assert after['iopfd_fault_groups_total{outcome="invalid",queue="lab"}'] == 72
