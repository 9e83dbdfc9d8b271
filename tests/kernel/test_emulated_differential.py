"""The emulated fault queue and the lab kernel give identical results for the same scenarios.

Each scenario drives a queue through triggers, raw read()s, raw write()s, polls and detaches, and
records what it observes; the transcript from each lab kernel's iommufd (6.12.117, 7.3.4) and the
one from ``EmulatedFaultQueue`` must be equal, byte for byte and errno for errno.
"""

from __future__ import annotations

import errno
import os
import select

import pytest

from iopfd.iommufd import SUCCESS, parse_groups
from iopfd.iommufd.fault import RECORD, RESPONSE
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]


class Driver:
    """Common observations; subclasses say how to reach their queue."""

    def __init__(self) -> None:
        self.transcript: list[tuple] = []

    def read(self, count: int) -> list[int]:
        try:
            data = self._read(count)
        except OSError as exc:
            self.transcript.append(("read", count, errno.errorcode[exc.errno]))
            return []
        self.transcript.append(("read", count, data.hex()))
        return [g.cookie for g in parse_groups(data)]

    def write(self, responses: list[tuple[int, int]]) -> None:
        self.write_bytes(b"".join(RESPONSE.pack(*r) for r in responses))

    def write_bytes(self, data: bytes) -> None:
        try:
            self.transcript.append(("write", len(data), self._write(data)))
        except OSError as exc:
            self.transcript.append(("write", len(data), errno.errorcode[exc.errno]))

    def poll(self) -> None:
        with select.epoll() as ep:
            ep.register(self.fileno(), select.EPOLLIN)
            self.transcript.append(("readable", bool(ep.poll(0))))


class KernelDriver(Driver):
    def __init__(self, rig, queue) -> None:
        super().__init__()
        self.rig, self.queue = rig, queue

    def fileno(self) -> int:
        return self.queue.fd

    def _read(self, count: int) -> bytes:
        return os.read(self.queue.fd, count)

    def _write(self, data: bytes) -> int:
        return os.write(self.queue.fd, data)

    def trigger(self, **fields) -> None:
        self.rig.device.trigger_iopf(**fields)

    def detach(self) -> None:
        self.rig.device.replace(self.rig.parent.id)

    def attach(self) -> None:
        self.rig.device.replace(self.rig.nested.id)


class EmulatedDriver(Driver):
    def __init__(self, dev_id: int) -> None:
        super().__init__()
        self.queue = EmulatedFaultQueue()
        self.dev_id = dev_id
        self.attached = True

    def fileno(self) -> int:
        return self.queue.fileno()

    def _read(self, count: int) -> bytes:
        return self.queue.read(count)

    def _write(self, data: bytes) -> int:
        return self.queue.write(data)

    def trigger(self, *, addr: int, pasid: int = 0, grpid: int = 0, perm: int = 1) -> None:
        if self.attached:  # else the kernel answers it INVALID itself and no queue sees it
            self.queue.report(PageRequest(self.dev_id, addr, pasid, grpid, perm))

    def detach(self) -> None:
        self.queue.detach(self.dev_id)
        self.attached = False

    def attach(self) -> None:
        self.attached = True


def one_group(d: Driver) -> None:
    d.poll()
    d.trigger(pasid=1, grpid=2, perm=3, addr=0xDEADBEAF)
    d.poll()
    cookies = d.read(10 * RECORD.size)
    d.poll()
    d.write([(c, SUCCESS) for c in cookies])
    d.write([(c, SUCCESS) for c in cookies])  # answered already
    d.read(10 * RECORD.size)


def bad_sizes(d: Driver) -> None:
    d.read(RECORD.size + 1)
    d.write_bytes(b"\0" * 7)
    d.write_bytes(b"")
    d.read(0)
    d.trigger(addr=0x1000)
    d.read(0)  # a pending group that cannot fit
    d.read(RECORD.size + 1)
    cookies = d.read(RECORD.size)
    d.write([(cookies[0], 2)])  # not a response code
    d.write([(cookies[0], 1)])


def batches(d: Driver) -> None:
    for i in range(3):
        d.trigger(addr=0x10000 * (i + 1), grpid=i, perm=1 + i)
    first = d.read(2 * RECORD.size)
    rest = d.read(5 * RECORD.size)
    cookies = first + rest
    d.write([(cookies[0], SUCCESS), (4242, SUCCESS), (cookies[1], SUCCESS), (cookies[2], SUCCESS)])
    d.write([(cookies[1], SUCCESS), (cookies[2], 1)])
    d.poll()


def cookie_reuse(d: Driver) -> None:
    for i in range(3):
        d.trigger(addr=0x2000 * (i + 1))
    cookies = d.read(8 * RECORD.size)
    d.write([(cookies[1], SUCCESS)])
    d.trigger(addr=0xA000)
    d.trigger(addr=0xB000)
    more = d.read(8 * RECORD.size)
    d.write([(c, SUCCESS) for c in [cookies[0], cookies[2], *more]])


def detach_and_reattach(d: Driver) -> None:
    d.trigger(addr=0x3000)
    d.trigger(addr=0x4000)
    cookies = d.read(RECORD.size)  # one read, one left undelivered
    d.detach()
    d.poll()
    d.write([(cookies[0], SUCCESS)])  # auto-answered by the detach
    d.read(8 * RECORD.size)
    d.trigger(addr=0x5000)  # nobody takes it
    d.read(8 * RECORD.size)
    d.attach()
    d.trigger(addr=0x6000)
    again = d.read(8 * RECORD.size)
    d.write([(c, SUCCESS) for c in again])


@pytest.mark.parametrize("scenario", [one_group, bad_sizes, batches, cookie_reuse, detach_and_reattach],
                         ids=lambda f: f.__name__)
def test_emulation_matches_the_kernel(scenario, rig, queue):
    kernel = KernelDriver(rig, queue)
    scenario(kernel)
    emulated = EmulatedDriver(rig.device.dev_id)
    scenario(emulated)
    emulated.queue.close()
    assert any(step[0] == "read" and len(step[2]) > 10 for step in kernel.transcript)  # groups really flowed
    assert emulated.transcript == kernel.transcript
