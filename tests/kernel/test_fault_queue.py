"""The fault fd's read/write/poll semantics, as the lab kernels implement them (6.12.117 and 7.3.4 alike)."""

from __future__ import annotations

import errno
import os
import select

import pytest

from iopfd.iommufd import INVALID, LAST_PAGE, PASID_VALID, PERM_READ, PERM_WRITE, SUCCESS, FaultQueue, respond_all
from iopfd.iommufd.fault import RECORD, RESPONSE

pytestmark = [pytest.mark.kernel, pytest.mark.guest]


def poll_events(fd: int) -> int:
    """The fd's readiness as epoll (what the daemon's event loop uses) reports it."""
    with select.epoll() as ep:
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
        return sum(event for _, event in ep.poll(0))


def trigger(rig, count: int, *, start: int = 0) -> None:
    for i in range(start, start + count):
        rig.device.trigger_iopf(addr=0x100000 + i * 0x1000, grpid=i % 512, perm=PERM_READ)


def test_trigger_makes_one_whole_group_readable(rig, queue):
    assert poll_events(queue.fd) == select.EPOLLOUT
    rig.device.trigger_iopf(pasid=1, grpid=2, perm=PERM_READ | PERM_WRITE, addr=0xDEADBEAF)
    assert poll_events(queue.fd) & select.EPOLLIN

    raw = bytes(queue.read_raw())
    assert len(raw) == RECORD.size  # exactly one record, one group
    flags, dev_id, pasid, grpid, perm, reserved, addr, length, cookie = RECORD.unpack(raw)
    assert flags == PASID_VALID | LAST_PAGE
    assert (dev_id, pasid, grpid, perm, addr) == (rig.device.dev_id, 1, 2, PERM_READ | PERM_WRITE, 0xDEADBEAF)
    assert (reserved, length) == (0, 0)
    assert cookie >= 1
    assert queue.respond([(cookie, SUCCESS)]) == 1


def test_parsed_group_matches_the_trigger(rig, queue):
    rig.device.trigger_iopf(grpid=7, perm=PERM_WRITE, addr=0x123000)
    (group,) = queue.read()
    (fault,) = group.faults
    assert group.dev_id == rig.device.dev_id
    assert (fault.grpid, fault.perm, fault.addr, fault.pasid_valid) == (7, PERM_WRITE, 0x123000, False)
    assert fault.flags == LAST_PAGE
    assert queue.respond([(group.cookie, INVALID)]) == 1


def test_empty_read_returns_zero_bytes_at_once(queue):
    assert os.read(queue.fd, 4 * RECORD.size) == b""
    assert queue.read() == []


def test_read_count_not_a_multiple_of_the_record_size_is_espipe(rig, queue):
    trigger(rig, 1)
    with pytest.raises(OSError) as info:
        os.read(queue.fd, RECORD.size + 1)
    assert info.value.errno == errno.ESPIPE
    assert len(queue.read()) == 1  # the group is still there


def test_write_count_not_a_multiple_of_the_response_size_is_espipe(queue):
    with pytest.raises(OSError) as info:
        os.write(queue.fd, b"\0" * (RESPONSE.size - 1))
    assert info.value.errno == errno.ESPIPE


def test_unknown_cookie_is_einval(queue):
    with pytest.raises(OSError) as info:
        os.write(queue.fd, RESPONSE.pack(12345, SUCCESS))
    assert info.value.errno == errno.EINVAL
    assert queue.respond([(12345, SUCCESS)]) == 0


def test_answering_a_cookie_twice_is_refused(rig, queue):
    trigger(rig, 1)
    (group,) = queue.read()
    assert queue.respond([(group.cookie, SUCCESS)]) == 1
    with pytest.raises(OSError) as info:
        os.write(queue.fd, RESPONSE.pack(group.cookie, SUCCESS))
    assert info.value.errno == errno.EINVAL


def test_a_bad_entry_mid_batch_consumes_only_the_entries_before_it(rig, queue):
    trigger(rig, 3)
    cookies = [g.cookie for g in queue.read()]
    assert len(cookies) == 3
    batch = [(cookies[0], SUCCESS), (999_999, SUCCESS), (cookies[1], SUCCESS), (cookies[2], SUCCESS)]
    written = os.write(queue.fd, b"".join(RESPONSE.pack(*r) for r in batch))
    assert written == RESPONSE.size  # stopped at the bad entry
    assert queue.respond(batch[2:]) == 2  # the rest were still pending


def test_respond_all_skips_exactly_the_refused_entries(rig, queue):
    trigger(rig, 3)
    cookies = [g.cookie for g in queue.read()]
    batch = [(cookies[0], SUCCESS), (777_777, SUCCESS), (cookies[1], SUCCESS), (888_888, INVALID),
             (cookies[2], SUCCESS)]
    assert respond_all(queue, batch) == [1, 3]
    assert queue.respond([(c, SUCCESS) for c in cookies]) == 0  # all three were answered


def test_an_invalid_response_code_is_refused(rig, queue):
    trigger(rig, 1)
    (group,) = queue.read()
    assert queue.respond([(group.cookie, 2)]) == 0  # only SUCCESS (0) and INVALID (1) exist
    assert queue.respond([(group.cookie, INVALID)]) == 1


def test_poll_has_pollout_always_and_pollin_only_for_undelivered_groups(rig, queue):
    assert poll_events(queue.fd) == select.EPOLLOUT
    trigger(rig, 2)
    assert poll_events(queue.fd) == select.EPOLLOUT | select.EPOLLIN
    groups = queue.read()
    assert len(groups) == 2
    assert poll_events(queue.fd) == select.EPOLLOUT  # read but unanswered groups do not count
    assert queue.respond([(g.cookie, SUCCESS) for g in groups]) == 2
    assert poll_events(queue.fd) == select.EPOLLOUT


def test_cookies_are_the_lowest_free_values_and_are_reused(rig, queue):
    trigger(rig, 2)
    first, second = queue.read()
    assert (first.cookie, second.cookie) == (1, 2)  # a fresh fault object
    assert queue.respond([(first.cookie, SUCCESS)]) == 1
    trigger(rig, 1)
    (third,) = queue.read()
    assert third.cookie == 1  # freed, so handed out again
    assert queue.respond([(second.cookie, SUCCESS), (third.cookie, SUCCESS)]) == 2


def test_replace_auto_answers_read_but_unanswered_groups(rig, queue):
    trigger(rig, 2)
    groups = queue.read()
    rig.device.replace(rig.parent.id)  # away from the fault-capable HWPT
    assert queue.respond([(groups[0].cookie, SUCCESS)]) == 0
    assert queue.respond([(groups[1].cookie, SUCCESS)]) == 0


def test_replace_auto_answers_undelivered_groups(rig, queue):
    trigger(rig, 3)
    rig.device.replace(rig.parent.id)
    assert queue.read() == []
    assert poll_events(queue.fd) == select.EPOLLOUT


def test_faults_after_replace_away_never_reach_the_queue(rig, queue):
    rig.device.replace(rig.parent.id)
    trigger(rig, 1)  # the kernel answers it INVALID itself
    assert queue.read() == []


def test_small_buffer_grows_to_fit_and_keeps_every_group(rig, ctx):
    with FaultQueue.alloc(ctx, batch_records=1) as small:
        rig.device.replace(rig.parent.id)
        from iopfd.iommufd import Hwpt, lib
        from iopfd.iommufd.selftest import SELFTEST_NESTED_DATA

        with Hwpt.nested(ctx, dev_id=rig.device.dev_id, parent_id=rig.parent.id,
                         data_type=lib.IOMMU_HWPT_DATA_SELFTEST, data=SELFTEST_NESTED_DATA,
                         fault_id=small.id) as nested:
            rig.device.replace(nested.id)
            trigger(rig, 5)
            seen = []
            while groups := small.read():
                assert len(groups) == 1  # one 40-byte record per read
                seen += groups
            assert len(seen) == 5
            assert small.respond([(g.cookie, SUCCESS) for g in seen]) == 5
            rig.device.replace(rig.parent.id)


def test_an_adopted_duplicate_fd_serves_the_same_queue(rig, queue):
    adopted = FaultQueue.adopt(os.dup(queue.fd))
    try:
        trigger(rig, 1)
        (group,) = adopted.read()
        assert queue.respond([(group.cookie, SUCCESS)]) == 1  # either fd answers
    finally:
        adopted.close()


def test_a_thousand_faults_are_all_read_and_answered_once(rig, queue):
    answered: set[int] = set()
    total = 0
    for batch_start in range(0, 1000, 100):
        trigger(rig, 100, start=batch_start)
        while groups := queue.read():
            total += len(groups)
            cookies = [g.cookie for g in groups]
            assert queue.respond([(c, SUCCESS) for c in cookies]) == len(cookies)
            answered.update(cookies)
    assert total == 1000
    assert poll_events(queue.fd) == select.EPOLLOUT
    assert all(queue.respond([(c, SUCCESS)]) == 0 for c in sorted(answered)[:50])  # none still open
