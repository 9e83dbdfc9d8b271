"""Crash recovery pieces on the host: the state file, the sweep, and fds sent to the fd store."""

from __future__ import annotations

import array
import json
import os
import socket

from iopfd.iommufd import INVALID, SUCCESS
from iopfd.iommufd.fault import RECORD, RESPONSE
from iopfd.service.recovery import StateFile, sweep
from iopfd.service.systemd import Notifier
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest


def test_the_mark_is_a_power_of_two_at_or_above_the_cookie_and_survives_a_new_life(tmp_path):
    state = StateFile(tmp_path)
    assert [state.mark("vm1", cookie) for cookie in (1, 2, 3, 5, 8, 9, 1000)] == [1, 2, 4, 8, 8, 16, 1024]
    state.remember("vm1", policy="reject", labels={"vm": "a"})
    again = StateFile(tmp_path)
    assert again.queues == {"vm1": {"cookie_mark": 1024, "policy": "reject", "labels": {"vm": "a"}}}
    again.forget("vm1")
    assert json.loads((tmp_path / "state.json").read_text()) == {}


def test_an_unreadable_state_file_is_not_fatal(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    assert StateFile(tmp_path).queues == {}


def test_sweep_answers_exactly_the_open_cookies():
    emulated = EmulatedFaultQueue()
    source = emulated.open()
    for i in range(6):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i))
    read = emulated.read(6 * RECORD.size)
    assert len(read) == 6 * RECORD.size  # cookies 1..6 open
    emulated.write(b"".join(RESPONSE.pack(cookie, SUCCESS) for cookie in (2, 5)))  # a previous life answered two
    assert sweep(source, 8) == [1, 3, 4, 6]
    assert emulated.pending_cookies == []
    assert [code for _, code in emulated.answers[2:]] == [INVALID] * 4
    emulated.close()


def test_store_fd_sends_the_fd_with_its_name(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        notifier = Notifier(str(tmp_path / "notify"))
        read_end, write_end = os.pipe()
        assert notifier.store_fd(read_end, "queue-vm1")
        fds = array.array("i")
        message, ancillary, _, _ = receiver.recvmsg(4096, socket.CMSG_LEN(4 * fds.itemsize))
        assert message.decode().splitlines() == ["FDSTORE=1", "FDNAME=queue-vm1"]
        fds.frombytes(ancillary[0][2])
        os.write(write_end, b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe
        assert notifier.remove_fd("queue-vm1")
        assert receiver.recv(4096).decode().splitlines() == ["FDSTOREREMOVE=1", "FDNAME=queue-vm1"]
        for fd in (read_end, write_end, fds[0]):
            os.close(fd)
        notifier.close()


def test_a_life_killed_between_a_read_and_its_mark_leaves_nothing_beyond_the_sweep():
    """The mark is written after the read that raised it. Killed in between, a life leaves one
    read's groups above the recorded mark; the restart's sweep still reaches every one of them."""
    emulated = EmulatedFaultQueue()
    source = emulated.open(batch_records=64)
    for i in range(200):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i))
    first = source.read_raw()
    highest = max(RECORD.unpack_from(first, o)[-1] for o in range(0, len(first), RECORD.size))
    recorded = 1 << max(highest - 1, 0).bit_length()  # what mark() writes for this read
    source.read_raw()  # the next read: killed before its mark is written
    assert max(emulated.pending_cookies) > recorded
    swept = sweep(source, StateFile.sweep_limit(recorded, source.buffer_records))
    assert len(swept) == 128 and emulated.pending_cookies == []
    emulated.close()
