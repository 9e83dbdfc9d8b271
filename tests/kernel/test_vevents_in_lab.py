"""vEVENTQs in the lab: the typed layer against the kernel's rules, overflow counted exactly, and the
daemon serving a fault fd and a vEVENTQ fd of one vIOMMU rig, with a ``forward`` peer receiving both.

The mock IOMMU reports a selftest vEVENT (its payload: the device's virt_id) on IOMMU_TEST_OP_TRIGGER_VEVENT
once the device sits on a nested HWPT of a selftest vIOMMU through a vDEVICE."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
import textwrap
import threading
import time
import urllib.request

import pytest

from iopfd.client import Client
from iopfd.engine import Engine, EventQueueReader, FixedPolicy, QueueConfig, QueueResponder
from iopfd.iommufd import (
    SUCCESS,
    Hwpt,
    InvalidArgument,
    Ioas,
    NotFound,
    NotSupported,
    SequenceTracker,
    VeventQueue,
    Viommu,
    lib,
)
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.probe import VEVENTQ, VIOMMU
from iopfd.iommufd.selftest import MockDevice, ViommuMockSetup
from iopfd.iommufd.viommu import LOST_EVENTS, MAX_DEPTH, SELFTEST
from iopfd_dev.daemon import spawn_daemon
from test_daemon import assert_kernel_has_nothing_pending, trigger

# The daemon is forked (iopfd_dev.forked: the same `iopfd run` without its start-up imports, which take
# 5-15 s in the TCG guest).
pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]
VIRT_ID = 0x99
METRICS = "127.0.0.1:9773"


@pytest.fixture
def viommu_rig(ctx, queue, require):
    """The vIOMMU rig with a selftest vEVENTQ of depth 4; faults go to ``queue``."""
    require(VEVENTQ)
    with ViommuMockSetup(ctx, queue.id, virt_id=VIRT_ID, depth=4) as setup:
        yield setup


def readable(fd: int) -> bool:
    with select.epoll() as ep:
        ep.register(fd, select.EPOLLIN)
        return bool(ep.poll(0))


def test_without_a_viommu_the_refusal_names_the_way_out(ctx, require_not):
    require_not(VIOMMU)
    with Ioas.alloc(ctx) as ioas, MockDevice.create(ctx, ioas.id) as device, \
            pytest.raises(NotSupported, match="needs a newer kernel"):
        Viommu.alloc(ctx, dev_id=device.dev_id, hwpt_id=device.hwpt_id, viommu_type=lib.IOMMU_VIOMMU_TYPE_SELFTEST)


def test_the_kernel_refuses_bad_vevent_queues_and_delivers_events_in_sequence(ctx, viommu_rig):
    rig = viommu_rig
    viommu = rig.viommu.id
    with pytest.raises(IommufdError, match="already has a vEVENTQ of type") as exists:
        VeventQueue.alloc(ctx, viommu_id=viommu, event_type=SELFTEST, depth=4)
    assert exists.value.errno == errno.EEXIST
    with pytest.raises(NotSupported, match="0, DEFAULT, is reserved"):
        VeventQueue.alloc(ctx, viommu_id=viommu, event_type=0, depth=4)
    for depth in (0, MAX_DEPTH + 1):
        with pytest.raises(InvalidArgument, match=f"depth {depth} is outside 1..{MAX_DEPTH}"):
            VeventQueue.alloc(ctx, viommu_id=viommu, event_type=lib.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, depth=depth)
    with pytest.raises(NotSupported, match="offers no vIOMMU of type 0x0"):
        Viommu.alloc(ctx, dev_id=rig.device.dev_id, hwpt_id=rig.parent.id, viommu_type=0)
    with Hwpt.alloc(ctx, dev_id=rig.device.dev_id, pt_id=rig.ioas.id) as paging, \
            pytest.raises(InvalidArgument, match="NEST_PARENT"):
        Viommu.alloc(ctx, dev_id=rig.device.dev_id, hwpt_id=paging.id, viommu_type=lib.IOMMU_VIOMMU_TYPE_SELFTEST)
    with MockDevice.create(ctx, rig.ioas.id) as bystander, pytest.raises(NotFound, match="not attached to a nested"):
        bystander.trigger_vevent()

    events = rig.events
    assert not readable(events.fd) and events.read() == []
    for _ in range(3):
        rig.device.trigger_vevent()
    assert readable(events.fd)
    for count in (0, 7, 8):  # less than a header, or a header without room for the event's payload
        with pytest.raises(OSError) as refused:
            os.read(events.fd, count)
        assert refused.value.errno == errno.EINVAL, count
    with pytest.raises(OSError) as refused:
        os.write(events.fd, bytes(12))
    assert refused.value.errno == errno.EINVAL
    records = events.read()
    assert [(r.flags, r.sequence, r.data) for r in records] == [(0, s, struct.pack("<I", VIRT_ID)) for s in range(3)]
    tracker = SequenceTracker()
    assert [tracker.lost_before(r) for r in records] == [0, 0, 0]
    assert not readable(events.fd)

    events.destroy()  # without a selftest vEVENTQ the vIOMMU has nowhere to report
    with pytest.raises(NotSupported, match="no vEVENTQ of type IOMMU_VEVENTQ_TYPE_SELFTEST"):
        rig.device.trigger_vevent()


def test_an_overflowed_queue_reports_exactly_what_the_kernel_dropped(viommu_rig):
    rig = viommu_rig
    for _ in range(10):  # depth 4: 0..3 queued, 4..9 dropped
        rig.device.trigger_vevent()
    records = rig.events.read()
    assert [(r.lost_events, r.sequence) for r in records] == [(False, 0), (False, 1), (False, 2), (False, 3), (True, 9)]
    assert records[-1].flags == LOST_EVENTS and records[-1].data == b""
    tracker = SequenceTracker()
    assert sum(tracker.lost_before(r) for r in records) == 6
    rig.device.trigger_vevent()
    (after,) = rig.events.read()
    assert (after.sequence, tracker.lost_before(after)) == (10, 0)  # the overflow is over


def test_the_engine_reads_counts_and_hands_events_in_order_even_past_a_failing_policy(queue, viommu_rig):
    rig = viommu_rig

    class Recording(FixedPolicy):
        def __init__(self) -> None:
            super().__init__("recording", SUCCESS)
            self.events = []

        async def on_event(self, event):
            self.events.append(event)
            if len(self.events) == 1:
                raise RuntimeError("a policy bug costs this event only")

    async def serve() -> tuple[EventQueueReader, Recording]:
        policy = Recording()
        engine = Engine()
        engine.add(QueueResponder(queue, policy, QueueConfig("vm")))
        events = EventQueueReader(rig.events, policy, "vm")
        engine.add_events(events)
        engine.start()
        for _ in range(10):  # the loop cannot read between these calls: 0..3 kept, 4..9 dropped
            rig.device.trigger_vevent()
        await until(lambda: events.stats.lost == 6 and len(policy.events) == 5)
        rig.device.trigger_vevent()
        rig.device.trigger_vevent()
        await until(lambda: events.stats.events == 6 and len(policy.events) == 7)
        await engine.stop(1.0)
        return events, policy

    events, policy = asyncio.run(serve())
    payload = struct.pack("<I", VIRT_ID)
    assert [(e.queue, e.type, e.sequence, e.lost, e.data) for e in policy.events] == [
        *(("vm", "selftest", s, 0, payload) for s in range(4)), ("vm", "selftest", 9, 6, None),
        ("vm", "selftest", 10, 0, payload), ("vm", "selftest", 11, 0, payload)]
    assert (events.stats.events, events.stats.lost, events.failure, events.reading) == (6, 6, None, False)
    assert not readable(rig.events.fd)


async def until(predicate, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_the_daemon_serves_a_fault_fd_and_a_veventq_fd_and_forwards_both(tmp_path, queue, viommu_rig):
    rig = viommu_rig
    for _ in range(10):  # overflow before iopfd ever reads: the kernel drops 6
        rig.device.trigger_vevent()
    path = str(tmp_path / "control.sock")
    (tmp_path / "iopfd.toml").write_text(textwrap.dedent("""
        [policies.vmm]
        type = "forward"
    """))
    iopfd = spawn_daemon(tmp_path, (), "--config", str(tmp_path / "iopfd.toml"), "--metrics-address", METRICS,
                         env={"IOPFD_CONTROL__PATH": path}, forked=True)
    try:
        vevents: list[tuple[int, int, bytes]] = []

        def take_events() -> None:
            while (event := channel.recv_event()) is not None:
                vevents.append(event)

        with Client(path) as control, Client(path, timeout=None) as peer:
            channel = peer.forward("vmm", events=True)
            answering = threading.Thread(target=channel.serve, args=(lambda records: SUCCESS,))
            receiving = threading.Thread(target=take_events)
            answering.start()
            receiving.start()
            control.attach(queue.fd, "vm", policy="vmm", labels={"vm": "guest1"},
                           veventq_fd=rig.events.fd, veventq_type="selftest")
            status = wait_vevents(control, events=4, lost=6)
            trigger(rig, 20)
            for _ in range(3):  # fewer than the depth: none can be dropped, however late iopfd reads
                rig.device.trigger_vevent()
            status = wait_vevents(control, events=7, lost=6)
            wait_until(lambda: len(vevents) >= 8 and control.status()["totals"]["success"] >= 20)
            metrics = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
            reply = control.detach("vm")
            channel.sock.shutdown(socket.SHUT_RDWR)  # ends both loops: the peer has had everything
            channel.events.shutdown(socket.SHUT_RDWR)
            answering.join(30)
            receiving.join(30)
            channel.close()
        assert status["vevents"] == {"type": "selftest", "reading": True, "events": 7, "lost": 6}
        assert reply["outcomes"]["success"] == 20
        assert 'iopfd_vevents_total{queue="vm",type="selftest"} 7.0' in metrics
        assert 'iopfd_vevents_lost_total{queue="vm"} 6.0' in metrics
        payload = struct.pack("<I", VIRT_ID)
        assert vevents == [  # as read() of the vEVENTQ returns them: header and payload, one per packet
            (0, 0, payload), (0, 1, payload), (0, 2, payload), (0, 3, payload), (LOST_EVENTS, 9, b""),
            *((0, s, payload) for s in range(10, 13))]
        (logged,) = [e for e in iopfd.log_events() if e["event"].startswith("vEVENTs lost")]
        assert (logged["lost"], logged["sequence"], logged["queue"], logged["vm"]) == (6, 9, "vm", "guest1")
        assert_kernel_has_nothing_pending(queue, 20)
        assert not readable(rig.events.fd)  # iopfd read every event
        assert iopfd.terminate() == 0
    finally:
        iopfd.close()


def wait_until(predicate, timeout: float = 60, what=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out {what()}"
        time.sleep(0.05)


def wait_vevents(client: Client, *, events: int, lost: int) -> dict:
    found = {}

    def counted() -> bool:
        (queue,) = client.status()["queues"]
        found.update(queue)
        return queue["vevents"]["events"] >= events and queue["vevents"]["lost"] >= lost

    wait_until(counted, what=lambda: found)
    return found
