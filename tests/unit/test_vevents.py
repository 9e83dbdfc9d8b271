"""vEVENTQ records, the lost-event arithmetic, their metrics and control-socket refusals, on the host.

The engine reading a real vEVENTQ fd is tested in the lab (tests/kernel/test_vevents_in_lab.py):
no emulated vEVENTQ stands in for the kernel here.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from iopfd.client import Client
from iopfd.engine import Engine, EventQueueReader, FixedPolicy, Policy, QueueConfig, QueueResponder
from iopfd.iommufd import SUCCESS, IommufdError, SequenceTracker, VeventQueue, VeventRecord
from iopfd.iommufd.viommu import (
    ARM_SMMUV3,
    LOST_EVENTS,
    SELFTEST,
    SEQUENCE_MASK,
    TYPES,
    MalformedVevents,
    parse_vevents,
)
from iopfd.protocol import ProtocolError
from iopfd.service.metrics import registry_for
from iopfd_dev.emulated import EmulatedFaultQueue
from server_in_loop import servers_in_loop

INT_MAX = 2**31 - 1


def selftest_event(sequence: int, virt_id: int) -> bytes:
    return struct.pack("<III", 0, sequence, virt_id)


def lost_header(sequence: int) -> bytes:
    return struct.pack("<II", LOST_EVENTS, sequence)


def test_records_split_at_the_payload_size_of_the_type_and_lost_headers_have_none():
    data = selftest_event(0, 0x99) + selftest_event(1, 0x99) + lost_header(5) + selftest_event(6, 0x88)
    assert parse_vevents(data, 4) == [
        VeventRecord(0, 0, struct.pack("<I", 0x99)), VeventRecord(0, 1, struct.pack("<I", 0x99)),
        VeventRecord(LOST_EVENTS, 5, b""), VeventRecord(0, 6, struct.pack("<I", 0x88))]
    smmu = struct.pack("<II", 0, 7) + bytes(range(32))
    (record,) = parse_vevents(smmu, 32)
    assert record.sequence == 7 and record.data == bytes(range(32)) and not record.lost_events
    assert parse_vevents(b"", 4) == []


@pytest.mark.parametrize("data, message", [
    (selftest_event(0, 1)[:10], "payload is cut short"),
    (selftest_event(0, 1) + b"\0" * 5, "less than a header"),
])
def test_bytes_that_are_not_whole_events_are_refused(data, message):
    with pytest.raises(MalformedVevents, match=message):
        parse_vevents(data, 4)


def losses(records: list[tuple[int, int]], tracker: SequenceTracker | None = None) -> list[int]:
    """``(flags, sequence)`` records -> events lost before each."""
    tracker = tracker or SequenceTracker()
    return [tracker.lost_before(VeventRecord(flags, sequence, b"")) for flags, sequence in records]


def test_a_fresh_queue_starts_at_sequence_0_and_consecutive_events_lose_nothing():
    assert losses([(0, 0), (0, 1), (0, 2)]) == [0, 0, 0]
    assert losses([(0, 3)]) == [3]  # 0, 1 and 2 were dropped (the kernel moved the header away)


def test_a_gap_between_real_events_counts_the_events_in_between():
    assert losses([(0, 0), (0, 1), (0, 5), (0, 6)]) == [0, 0, 3, 0]


def test_a_lost_header_stands_for_every_sequence_up_to_and_including_its_own():
    # depth 4, 10 triggered before any read: 0..3 queued, 4..9 dropped, the header carries 9
    assert losses([(0, 0), (0, 1), (0, 2), (0, 3), (LOST_EVENTS, 9)]) == [0, 0, 0, 0, 6]
    assert losses([(0, 0), (LOST_EVENTS, 9), (0, 10)]) == [0, 9, 0]  # 1..9 dropped; nothing after the header


def test_a_lost_header_first_counts_from_sequence_0():
    assert losses([(LOST_EVENTS, 0)]) == [1]
    assert losses([(LOST_EVENTS, 4), (0, 5)]) == [5, 0]


def test_the_sequence_wraps_from_int_max_to_0():
    assert SEQUENCE_MASK == INT_MAX
    tracker = SequenceTracker(INT_MAX - 2)
    assert losses([(0, INT_MAX - 1), (0, INT_MAX), (0, 0), (0, 1)], tracker) == [0, 0, 0, 0]
    tracker = SequenceTracker(INT_MAX - 1)
    assert losses([(0, 2)], tracker) == [3]  # INT_MAX, 0 and 1 were dropped
    tracker = SequenceTracker(INT_MAX)
    assert losses([(LOST_EVENTS, 3), (0, 4)], tracker) == [4, 0]


def test_type_names_are_the_few_iopfd_knows_and_an_unknown_type_is_refused_naming_them():
    assert TYPES == {"selftest": SELFTEST, "arm-smmuv3": ARM_SMMUV3}
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(IommufdError, match="does not know the event size of vEVENTQ type 0x7"):
            VeventQueue(None, 0, read_end, 7)
        with pytest.raises(IommufdError, match=r"pipe:\[.*not a vEVENTQ fd \(anon_inode:\[iommufd-viommu-event\]\)"):
            VeventQueue.adopt(read_end, SELFTEST)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_metrics_have_queue_and_type_labels_only():
    engine = Engine()
    emulated = EmulatedFaultQueue()
    read_end, write_end = os.pipe()
    engine.add(QueueResponder(emulated.open(), FixedPolicy("accept", SUCCESS), QueueConfig("vm1")))
    events = EventQueueReader(VeventQueue(None, 0, read_end, SELFTEST), FixedPolicy("accept", SUCCESS), "vm1")
    engine.add_events(events)
    events.stats.events, events.stats.lost = 4, 6
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for metric in registry_for(engine).collect() for sample in metric.samples
               if sample.name.startswith("iopfd_vevents")}
    assert samples == {
        ("iopfd_vevents_total", (("queue", "vm1"), ("type", "selftest"))): 4,
        ("iopfd_vevents_lost_total", (("queue", "vm1"),)): 6,
    }
    assert engine.totals()["vevents"] == 4 and engine.totals()["vevents_lost"] == 6
    with pytest.raises(ValueError, match="no fault queue named 'vm2'"):
        engine.add_events(EventQueueReader(VeventQueue(None, 0, write_end, SELFTEST), FixedPolicy("accept", SUCCESS),
                                           "vm2"))
    os.close(read_end)
    os.close(write_end)
    emulated.close()


def test_policies_ignore_events_unless_they_take_them():
    class Taking(Policy):
        async def on_event(self, event):
            pass

    read_end, write_end = os.pipe()
    source = VeventQueue(None, 0, read_end, SELFTEST)
    try:
        assert not EventQueueReader(source, FixedPolicy("accept", SUCCESS), "q")._delivers
        assert EventQueueReader(source, Taking(), "q")._delivers
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.asyncio
async def test_attach_with_a_veventq_fd_refuses_what_does_not_fit_the_protocol(tmp_path):
    async with servers_in_loop(tmp_path) as start:
        _, path = await start()
        pipes = [os.pipe() for _ in range(2)]
        a, b, c = pipes[0][0], pipes[0][1], pipes[1][0]
        try:
            for fds, fields, code, words in [
                ((a, b), {}, "bad-request", "veventq_type: the type of the vEVENTQ fd, one of arm-smmuv3, selftest"),
                ((a, b), {"veventq_type": "nope"}, "bad-request", "got 'nope'"),
                ((a, b), {"veventq_type": ["selftest"]}, "bad-request", "veventq_type"),
                ((a,), {"veventq_type": "selftest"}, "missing-fd", "only one fd came"),
                ((a, b, c), {"veventq_type": "selftest"}, "missing-fd", "got 3 fds"),
                ((a, b), {"veventq_type": "selftest"}, "not-a-fault-fd", "not an iommufd fault fd"),
            ]:
                def run(fds=fds, fields=fields):
                    with Client(path, timeout=10) as client:
                        return client.request("attach", fds, queue="vm1", **fields)

                with pytest.raises(ProtocolError) as refused:
                    await asyncio.to_thread(run)
                assert (refused.value.code, words in refused.value.message) == (code, True), refused.value
        finally:
            for read_end, write_end in pipes:
                os.close(read_end)
                os.close(write_end)
