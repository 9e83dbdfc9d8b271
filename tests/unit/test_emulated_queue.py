"""What the emulated queue models beyond the mock device's reach: multi-record groups, partials."""

from __future__ import annotations

import errno
import select

import pytest

from iopfd.iommufd import INVALID, SUCCESS, parse_groups
from iopfd.iommufd.fault import RECORD, RESPONSE
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest


@pytest.fixture
def queue():
    q = EmulatedFaultQueue()
    yield q
    q.close()


def readable(q: EmulatedFaultQueue) -> bool:
    return bool(select.select([q.fileno()], [], [], 0)[0])


def test_partials_wait_for_last_page_of_their_grpid(queue):
    queue.report(PageRequest(dev_id=1, addr=0x1000, grpid=7, last=False))
    queue.report(PageRequest(dev_id=1, addr=0x9000, grpid=8, last=False))
    queue.report(PageRequest(dev_id=1, addr=0x2000, grpid=7, last=False))
    assert not readable(queue) and queue.read(10 * RECORD.size) == b""
    queue.report(PageRequest(dev_id=1, addr=0x3000, grpid=7))
    assert readable(queue)
    (group,) = parse_groups(queue.read(10 * RECORD.size))
    assert [f.addr for f in group.faults] == [0x1000, 0x2000, 0x3000]  # the LAST_PAGE request last
    assert not readable(queue)


def test_a_group_larger_than_the_buffer_is_einval_and_stays_queued(queue):
    for i in range(3):
        queue.report(PageRequest(dev_id=1, addr=i, grpid=1, last=i == 2))
    with pytest.raises(OSError) as info:
        queue.read(2 * RECORD.size)
    assert info.value.errno == errno.EINVAL
    assert queue.undelivered == 1 and readable(queue)
    assert len(parse_groups(queue.read(3 * RECORD.size))[0].faults) == 3


def test_detach_answers_undelivered_and_read_groups_of_that_device_only(queue):
    for dev_id in (1, 2, 1):
        queue.report(PageRequest(dev_id=dev_id, addr=0x1000 * dev_id))
    read = parse_groups(queue.read(RECORD.size))  # dev 1's first group is now pending
    queue.detach(1)
    assert queue.pending_cookies == [] and queue.undelivered == 1
    assert [(g[-1].dev_id, code) for g, code in queue.answers] == [(1, INVALID), (1, INVALID)]
    with pytest.raises(OSError):
        queue.write(RESPONSE.pack(read[0].cookie, SUCCESS))
    (left,) = parse_groups(queue.read(RECORD.size))
    assert left.dev_id == 2


def test_answers_record_the_codes_user_space_wrote(queue):
    queue.report(PageRequest(dev_id=3, addr=0x5000))
    (group,) = parse_groups(queue.read(RECORD.size))
    assert queue.write(RESPONSE.pack(group.cookie, SUCCESS)) == RESPONSE.size
    assert [(g[-1].addr, code) for g, code in queue.answers] == [(0x5000, SUCCESS)]
