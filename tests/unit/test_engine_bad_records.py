"""Whatever records a read returns (unknown flag bits, cookie 0, a cookie twice, groups cut off
without LAST_PAGE, absurd fields), the engine keeps serving and each group the kernel holds is
answered exactly once, with the right code.

The kernel here is a model: every distinct nonzero cookie of a read is one group it holds until
answered. Its write() consumes responses until the first it refuses (cookie not held, or a code
other than SUCCESS/INVALID) and returns the bytes consumed, or fails with EINVAL when it refuses
the first. A cookie read again while still held means the kernel answered the old group itself
(a detach or replace does) and issued the cookie to a new one."""

from __future__ import annotations

import asyncio
import errno
import os

import numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from iopfd.engine import BatchPolicy, FixedPolicy, Policy, QueueConfig, QueueResponder
from iopfd.iommufd import INVALID, SUCCESS
from iopfd.iommufd.fault import LAST_PAGE, PASID_VALID, RECORD, RESPONSE, FaultGroup, FaultQueue

KERNEL = None  # a group the kernel answered itself, in ModelKernel.answers


class ModelKernel(FaultQueue):
    def __init__(self, reads: list[bytes]) -> None:
        super().__init__(None, 0, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))  # the loop's reader watches it
        self.reads = list(reads)
        self.issued = 0  # reads returned so far
        self.held: dict[int, int] = {}  # cookie -> the read that issued it
        self.answers: list[tuple[int, int, int | None]] = []  # (read, cookie, code or KERNEL)
        self.most_held = 0  # the most cookies pending at once

    def _readinto(self, buffer: bytearray) -> int:
        if not self.reads:
            return 0
        data = self.reads.pop(0)
        for cookie in dict.fromkeys(cookie for *_, cookie in RECORD.iter_unpack(data)):
            if cookie == 0:
                continue  # never issued: nothing to answer
            if cookie in self.held:
                self.answers.append((self.held[cookie], cookie, KERNEL))
            self.held[cookie] = self.issued
        self.issued += 1
        self.most_held = max(self.most_held, len(self.held))
        buffer[:len(data)] = data
        return len(data)

    def _write(self, data) -> int:
        consumed = 0
        for cookie, code in RESPONSE.iter_unpack(data):
            if code not in (SUCCESS, INVALID) or cookie not in self.held:
                break
            self.answers.append((self.held.pop(cookie), cookie, code))
            consumed += RESPONSE.size
        if not consumed:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return consumed

    def _has_input(self) -> bool:
        return bool(self.reads)


class ByContent(Policy):
    """Decides from the group's records, after a number of loop turns that depends on them, so
    decisions come back out of read order (and after later reads)."""

    name = "by-content"

    async def decide(self, group: FaultGroup) -> int:
        for _ in range(group.addresses[-1] % 4):
            await asyncio.sleep(0)
        return decision([(fault.perm, fault.addr) for fault in group.faults])


class ByContentInBatches(BatchPolicy):
    """ByContent's codes from the batch's columns, one call per read, answered a few loop turns later:
    a batch goes on deciding a group whose cookie was reissued meanwhile, so its late answer must be
    dropped."""

    name = "by-content-batch"

    def decide_batch(self, batch):
        codes = numpy.where(batch.perm & 1, SUCCESS, INVALID)

        async def later():
            for _ in range(len(batch) % 4):
                await asyncio.sleep(0)
            return codes
        return later()


def decision(records: list[tuple[int, int]]) -> int:
    """ByContent's code for a group of (perm, addr) records, computed apart from the engine's view."""
    perm = 0
    for record_perm, _ in records:
        perm |= record_perm
    return SUCCESS if perm & 1 else INVALID


u32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**31, 2**32 - 1])
cookies = st.integers(0, 6) | u32  # small ones repeat within and across reads; 0 is never issued
flags = st.tuples(st.booleans(), u32).map(lambda pair: pair[1] & ~LAST_PAGE | (LAST_PAGE if pair[0] else 0))
addresses = st.integers(0, 2**64 - 1) | st.sampled_from([0, 2**63, 2**64 - 1])


@st.composite
def records(draw, cookie=None, flag=None) -> bytes:
    return RECORD.pack(draw(flags) if flag is None else flag, draw(u32), draw(u32), draw(u32), draw(u32), draw(u32),
                       draw(addresses), draw(u32), draw(cookies) if cookie is None else cookie)


@st.composite
def whole_group(draw) -> bytes:
    """Records the kernel would send: one cookie, LAST_PAGE on the last only (other bits at random)."""
    cookie, size = draw(cookies), draw(st.integers(1, 3))
    return b"".join(draw(records(cookie, draw(flags) & ~LAST_PAGE | (LAST_PAGE if i == size - 1 else 0)))
                    for i in range(size))


reads = st.lists(st.lists(records() | whole_group(), min_size=1, max_size=8).map(b"".join), min_size=1, max_size=6)


def expected_codes(data: bytes, policy: Policy, shedding: bool) -> dict[int, set[int]]:
    """The codes the engine may answer each nonzero cookie of one read with. A cookie is a whole
    group when it is in exactly one run of records (runs end at LAST_PAGE) and that run is all
    its own and ends at LAST_PAGE; anything else is malformed and answered INVALID."""
    unpacked = list(RECORD.iter_unpack(data))
    runs, run = [], []
    for record in unpacked:
        run.append(record)
        if record[0] & LAST_PAGE:
            runs.append(run)
            run = []
    if run:
        runs.append(run)  # cut off at the end of the read: no LAST_PAGE
    codes = {}
    for cookie in {record[-1] for record in unpacked} - {0}:
        mine = [run for run in runs if any(record[-1] == cookie for record in run)]
        whole = len(mine) == 1 and all(record[-1] == cookie for record in mine[0]) and mine[0][-1][0] & LAST_PAGE
        if not whole:
            # accept answers a read of one-record groups from its cookie column (when nothing else is
            # pending) and leaves a cookie's second group to the kernel, which refuses its answer
            one_record_groups = all(record[0] & LAST_PAGE for record in unpacked)
            fixed = isinstance(policy, FixedPolicy) and one_record_groups
            codes[cookie] = {INVALID, policy.code} if fixed else {INVALID}
        elif isinstance(policy, FixedPolicy):
            codes[cookie] = {policy.code}
        else:
            codes[cookie] = {decision([(record[4], record[6]) for record in mine[0]])}
        if shedding and whole:
            codes[cookie] |= {INVALID}
    return codes


async def serve(data: list[bytes], policy: Policy, pauses: list[int], max_pending: int, mark: bool) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []  # a callback (the flush) that raised
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    tasks: list[asyncio.Task] = []  # policy calls: none may end with an exception
    loop.set_task_factory(lambda loop, coro, **kw: tasks.append(asyncio.Task(coro, loop=loop, **kw)) or tasks[-1])
    kernel = ModelKernel(data)
    responder = QueueResponder(kernel, policy, QueueConfig("q", response_deadline=30, max_pending=max_pending))
    if mark:
        responder.cookie_mark_hook = lambda cookie: cookie
    responder.start()
    try:
        for pause in [*pauses, 0]:
            if not kernel.reads:
                break
            responder._on_readable()  # what the loop calls while the fd is readable; raises nothing
            for _ in range(pause):  # policies decide between wakeups, or not yet
                await asyncio.sleep(0)
        while kernel.reads:  # a queue full under max_pending reads again as decisions make room
            responder._on_readable()
            await asyncio.sleep(0)
        async with asyncio.timeout(2):  # every group answered and written back
            while responder.pending:
                await asyncio.sleep(0.001)
        assert responder.failure is None and responder.reading
        assert kernel.held == {}, "groups the kernel still holds"
        issued = [(index, cookie) for index, read in enumerate(data)
                  for cookie in dict.fromkeys(cookie for *_, cookie in RECORD.iter_unpack(read)) if cookie]
        assert sorted((index, cookie) for index, cookie, _ in kernel.answers) == sorted(issued)  # each once
        for index, cookie, code in kernel.answers:
            if code is not KERNEL:
                allowed = expected_codes(data[index], policy, shedding=max_pending < 1000)[cookie]
                assert code in allowed, (index, cookie, code, allowed)
        if mark:  # a real kernel's cookies are the lowest free: the mark must cover that many
            assert responder.cookie_mark >= kernel.most_held
    finally:
        await responder.stop(0)
        kernel.close()
    assert loop_errors == []
    assert [task.exception() for task in tasks if task.done() and not task.cancelled() and task.exception()] == []


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scenario = dict(data=reads, pauses=st.lists(st.integers(0, 6), max_size=6), max_pending=st.sampled_from([2, 4096]),
                mark=st.booleans())


@FUZZ
@given(**scenario)
def test_accept_policy(data, pauses, max_pending, mark):
    with capture_logs():
        asyncio.run(serve(data, FixedPolicy("accept", SUCCESS), pauses, max_pending, mark))


@FUZZ
@given(**scenario)
def test_per_group_policy(data, pauses, max_pending, mark):
    with capture_logs():
        asyncio.run(serve(data, ByContent(), pauses, max_pending, mark))


@FUZZ
@given(**scenario)
def test_batch_policy(data, pauses, max_pending, mark):
    with capture_logs():
        asyncio.run(serve(data, ByContentInBatches(), pauses, max_pending, mark))


def test_the_model_refuses_like_the_kernel():
    """A write stops at the first response the kernel refuses; refusing the first is EINVAL."""
    kernel = ModelKernel([RECORD.pack(LAST_PAGE, 0, 0, 0, 0, 0, 0, 0, 5) + RECORD.pack(PASID_VALID | LAST_PAGE,
                                                                                         0, 0, 0, 0, 0, 0, 0, 6)])
    kernel.read_raw()
    assert kernel.respond([(5, SUCCESS), (9, SUCCESS), (6, SUCCESS)]) == 1
    assert kernel.respond([(5, SUCCESS)]) == 0  # EINVAL: already answered
    assert kernel.respond([(6, 7)]) == 0  # no such code
    assert kernel.respond([(6, INVALID)]) == 1 and kernel.held == {}
    assert kernel.answers == [(0, 5, SUCCESS), (0, 6, INVALID)]
    kernel.close()
