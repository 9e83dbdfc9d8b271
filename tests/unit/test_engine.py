"""The engine against the emulated fault queue: every group read is answered exactly once."""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from iopfd.engine import Batch, BatchPolicy, Engine, FixedPolicy, Policy, QueueConfig, QueueResponder
from iopfd.engine.queue import (
    MAX_PENDING,
    MAX_READS_PER_WAKEUP,
    PARKED_EARLY,
    PARKED_FACTOR,
    PARKED_WRITE_MARGIN,
    PER_GROUP_MAX_PENDING,
)
from iopfd.iommufd import INVALID, SUCCESS
from iopfd.iommufd.fault import LAST_PAGE, RECORD, RESPONSE, FaultGroup, FaultQueue
from iopfd.policies import Policies
from iopfd_dev.emulated import EmulatedFaultFd, EmulatedFaultQueue, PageRequest

pytestmark = pytest.mark.asyncio


class Gate(Policy):
    """Decides each group when the test says so (or never)."""

    name = "gate"

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future] = {}

    async def decide(self, group: FaultGroup) -> int:
        future = asyncio.get_running_loop().create_future()
        self.waiting[group.cookie] = future
        return await future

    def release(self, code: int = SUCCESS) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_result(code)
        self.waiting.clear()


class BatchGate(BatchPolicy):
    """Holds the batches it gets until the test releases them (or never)."""

    name = "batch-gate"

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    @property
    def holding(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def decide_batch(self, batch: Batch) -> None:
        self.batches.append(batch)

    def release(self, code: int = SUCCESS) -> None:
        for batch in self.batches:
            batch.answer(slice(None), code)
        self.batches.clear()


class Served:
    def __init__(self, policy: Policy, **config) -> None:
        self.emulated = EmulatedFaultQueue()
        self.responder = QueueResponder(self.emulated.open(), policy, QueueConfig("q", **config))

    def report(self, count: int, *, dev_id: int = 1, start: int = 0) -> None:
        for i in range(start, start + count):
            self.emulated.report(PageRequest(dev_id=dev_id, addr=0x1000 * (i + 1), grpid=i % 512))

    def codes(self) -> list[int]:
        return [code for _, code in self.emulated.answers]

    async def settle(self, timeout: float = 5.0) -> None:
        """Until the daemon has read everything and written every answer back."""
        async with asyncio.timeout(timeout):
            while self.emulated.undelivered or self.responder.pending:
                await asyncio.sleep(0.001)

    async def until(self, condition, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.001)


@pytest_asyncio.fixture
async def served():
    made = []

    def make(policy: Policy, **config) -> Served:
        made.append(Served(policy, **config))
        made[-1].responder.start()
        return made[-1]

    yield make
    for s in made:
        await s.responder.stop(0)
        s.emulated.close()


async def test_accept_answers_every_group_success(served):
    s = served(FixedPolicy("accept", SUCCESS))
    s.report(1000)
    await s.settle()
    assert s.codes() == [SUCCESS] * 1000
    assert s.emulated.pending_cookies == []
    assert s.responder.stats.outcomes["success"] == 1000 and s.responder.stats.faults == 1000
    assert s.responder.stats.latency.count == 1000
    assert s.responder.stats.read_batches.sum == 1000


async def test_reject_answers_invalid(served):
    s = served(FixedPolicy("reject", INVALID))
    s.report(10)
    await s.settle()
    assert s.codes() == [INVALID] * 10 and s.responder.stats.outcomes["invalid"] == 10


async def test_multi_record_groups_are_answered_once_each(served):
    s = served(FixedPolicy("accept", SUCCESS))
    for grpid in range(5):
        for i in range(3):
            s.emulated.report(PageRequest(dev_id=2, addr=0x1000 * i, grpid=grpid, last=i == 2))
    await s.settle()
    assert [len(group) for group, _ in s.emulated.answers] == [3] * 5
    assert s.responder.stats.faults == 15 and s.responder.stats.outcomes["success"] == 5


async def test_a_group_larger_than_the_buffer_grows_it(served):
    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=2), FixedPolicy("accept", SUCCESS), QueueConfig("q"))
    responder.start()
    for i in range(9):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=1, last=i == 8))
    async with asyncio.timeout(5):
        while not emulated.answers:
            await asyncio.sleep(0.001)
    assert emulated.answers[0][1] == SUCCESS and responder.source.buffer_records >= 9
    await responder.stop(0)


async def test_a_kernel_that_returns_0_bytes_for_a_group_too_big_still_gets_it_read():
    """Before 6.12.101 a too-small buffer read 0 bytes while the fd stayed readable."""
    class OldKernel(EmulatedFaultFd):
        def _readinto(self, buffer):
            try:
                return super()._readinto(buffer)
            except OSError:
                return 0

    emulated = EmulatedFaultQueue()
    responder = QueueResponder(OldKernel(emulated, batch_records=1), FixedPolicy("accept", SUCCESS), QueueConfig("q"))
    responder.start()
    emulated.report(PageRequest(dev_id=1, addr=0))
    for i in range(3):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=2, last=i == 2))
    async with asyncio.timeout(5):
        while len(emulated.answers) < 2:
            await asyncio.sleep(0.001)
    assert [(len(group), code) for group, code in emulated.answers] == [(1, SUCCESS), (3, SUCCESS)]
    assert responder.source.buffer_records >= 3
    await responder.stop(0)
    emulated.close()


async def test_per_group_policy_decides_each_group(served):
    class ByDevice(Policy):
        async def decide(self, group):
            await asyncio.sleep(0)
            return SUCCESS if group.dev_id == 1 else INVALID

    s = served(ByDevice())
    s.report(3, dev_id=1)
    s.report(2, dev_id=2)
    await s.settle()
    assert sorted((group[0].dev_id, code) for group, code in s.emulated.answers) == \
        [(1, SUCCESS)] * 3 + [(2, INVALID)] * 2


@pytest.mark.parametrize("behaviour", ["raise", "none", "seven", "true", "string"])
async def test_a_broken_policy_costs_the_group_an_invalid_answer_and_a_log_line(served, behaviour):
    class Broken(Policy):
        name = "broken"

        async def decide(self, group):
            if behaviour == "raise":
                raise RuntimeError("policy bug")
            return {"none": None, "seven": 7, "true": True, "string": "success"}[behaviour]

    s = served(Broken())
    with capture_logs() as logs:
        s.report(3)
        await s.settle()
    assert s.codes() == [INVALID] * 3 and s.responder.stats.outcomes["error"] == 3
    errors = [entry for entry in logs if entry["log_level"] == "error"]  # a line per group, or per batch
    assert errors and sum(entry.get("groups", 1) for entry in errors) == 3
    s.report(1)  # the queue is still served
    await s.settle()
    assert len(s.codes()) == 4


async def test_a_batch_policy_returning_the_wrong_number_of_codes_is_an_error(served):
    class Short(BatchPolicy):
        def decide_batch(self, batch):
            return [SUCCESS]

    s = served(Short())
    s.report(5)
    await s.settle()
    assert s.codes() == [INVALID] * 5 and s.responder.stats.outcomes["error"] == 5


@pytest.mark.parametrize("deadline_code", [INVALID, SUCCESS])
async def test_a_hanging_policy_is_abandoned_at_the_deadline(served, deadline_code):
    gate = Gate()
    s = served(gate, response_deadline=0.05, deadline_code=deadline_code)
    s.report(4)
    await s.until(lambda: len(gate.waiting) == 4)
    assert s.codes() == []  # not before the deadline
    await s.settle()
    assert s.codes() == [deadline_code] * 4 and s.responder.stats.outcomes["deadline"] == 4
    await asyncio.sleep(0)
    assert all(future.cancelled() for future in gate.waiting.values())  # the policy calls were cancelled
    # due a twentieth of the deadline early at most, so that a loop turn cannot make it late
    assert min(s.responder.stats.latency.sum / 4, 1) >= 0.05 * 19 / 20 - 1e-3


async def test_a_group_raised_after_the_queue_was_emptied_gets_a_clock_of_its_own():
    """A wakeup that ends at its read limit with the kernel's queue just emptied gets no callback
    after it: the next group's clock must still start at that group's own readiness. (It once
    inherited the old one and was answered with the deadline code at once, in the lab.)"""
    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=5), Gate(), QueueConfig("q", response_deadline=0.2))
    responder.start()
    for i in range(5 * MAX_READS_PER_WAKEUP):  # exactly one wakeup's reads
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * (i + 1), grpid=i))
    async with asyncio.timeout(5):
        while len(emulated.answers) < 5 * MAX_READS_PER_WAKEUP:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    raised = time.monotonic()
    emulated.report(PageRequest(dev_id=1, addr=0x100000, grpid=1))
    async with asyncio.timeout(5):
        while len(emulated.answers) < 5 * MAX_READS_PER_WAKEUP + 1:
            await asyncio.sleep(0.001)
    assert time.monotonic() - raised >= 0.15  # its own deadline, less DEADLINE_EARLY
    await responder.stop(0)
    emulated.close()


async def test_a_late_decision_never_answers_the_group_that_reused_its_cookie(served):
    class LateThenGate(Gate):
        """The first call ignores cancellation and answers late; later calls wait for the test."""

        def __init__(self):
            super().__init__()
            self.late: asyncio.Future | None = None

        async def decide(self, group):
            if self.late is None:
                self.late = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    await self.late  # swallow the cancellation, answer when the test says
                    return INVALID
            return await super().decide(group)

    policy = LateThenGate()
    s = served(policy, response_deadline=0.05, deadline_code=SUCCESS)
    s.report(1)
    await s.until(lambda: len(s.codes()) == 1)  # answered by the deadline: cookie 1 is free again
    s.report(1, start=1)
    await s.until(lambda: 1 in policy.waiting)  # the second group got cookie 1
    policy.late.set_result(None)  # the first decision arrives late, for cookie 1
    await asyncio.sleep(0.01)
    assert s.emulated.pending_cookies == [1] and s.codes() == [SUCCESS]
    policy.release(INVALID)
    await s.settle()
    assert s.codes() == [SUCCESS, INVALID]


async def test_a_cookie_reissued_after_a_detach_voids_the_old_decision(served):
    gate = Gate()
    s = served(gate, response_deadline=30)
    s.report(1, dev_id=1)
    await s.until(lambda: 1 in gate.waiting)
    old = gate.waiting.pop(1)
    s.emulated.detach(1)  # the kernel answers cookie 1 itself and may hand it out again
    s.report(1, dev_id=2)
    await s.until(lambda: 1 in gate.waiting)  # the new group, same cookie
    assert old.cancelled()  # the void decision is not awaited any more
    assert s.responder.stats.outcomes["error"] == 1 and s.responder.stats.write_errors == 1
    assert s.emulated.pending_cookies == [1]
    gate.release(SUCCESS)
    await s.settle()
    assert [(group[0].dev_id, code) for group, code in s.emulated.answers] == [(1, INVALID), (2, SUCCESS)]


async def test_groups_read_beyond_max_pending_wait_parked_and_only_beyond_that_are_shed(served):
    """A read that does not fit under max_pending loses nothing: its groups wait, read, for room (up
    to PARKED_FACTOR times max_pending more) and reach the policy, oldest first, as decisions close
    groups. Only what exceeds that is shed, at once."""
    gate = BatchGate()
    held = 4 * (1 + PARKED_FACTOR)
    s = served(gate, max_pending=4, response_deadline=30)
    with capture_logs() as logs:
        s.report(held + 6)  # one read
        await s.until(lambda: len(s.codes()) == 6)
    assert s.codes() == [INVALID] * 6 and s.responder.stats.outcomes["shed"] == 6
    assert gate.holding == 4 and s.responder.pending == held and s.responder.parked == held - 4
    assert any("shed" in entry["event"] for entry in logs)
    for _ in range(held // 4):  # each answer makes room for the next four
        await s.until(lambda: gate.holding == 4)
        gate.release(SUCCESS)
    await s.settle()
    assert s.codes() == [INVALID] * 6 + [SUCCESS] * held


async def test_parked_groups_that_do_not_reach_the_policy_in_time_get_the_deadline_code_first(served):
    """Parked groups still waiting near their deadline (at least PARKED_EARLY of it before the due
    time) are answered with the deadline code then, ahead of the groups the policy holds, and never
    reach it."""
    gate = BatchGate()
    s = served(gate, max_pending=4, response_deadline=0.5)
    s.report(12)  # one read: 4 for the policy, which never decides, and 8 parked
    await s.until(lambda: len(s.codes()) == 8, timeout=5)
    assert gate.holding == 4 and s.responder.parked == 0 and s.responder.pending == 4
    await s.settle()
    assert s.codes() == [INVALID] * 12 and s.responder.stats.outcomes["deadline"] == 12
    assert gate.holding == 4  # the parked ones never reached it


async def test_the_more_groups_are_parked_the_earlier_they_get_the_deadline_code(served):
    """Parked groups get the deadline code ahead of their due time by twice what writing all their
    answers takes at this queue's measured cost per answer, so that a storm's many deadline answers
    are written in time, and by no more than PARKED_EARLY of the deadline when few are parked."""
    gate = BatchGate()
    s = served(gate, max_pending=64, response_deadline=1.0)
    s.report(300)  # one read: 64 to the policy, 236 parked
    await s.until(lambda: s.responder.parked == 236)
    due = s.responder._due()
    assert s.responder._parked_due() == pytest.approx(due - PARKED_EARLY)  # 236 answers: well under 50 ms
    s.responder._write_cost = 2e-4  # as if each answer took 0.2 ms to write: 236 of them take 47 ms
    assert s.responder._parked_due() == pytest.approx(due - 236 * 2e-4 * PARKED_WRITE_MARGIN)
    s.report(300, start=300)  # more parked: due earlier still, and the timer is armed for that
    await s.until(lambda: s.responder.parked == 536)
    timer = s.responder._parked_timer
    assert timer is not None and timer.when() == pytest.approx(
        s.responder._reads[min(s.responder._reads)].started_at + due - 536 * 2e-4 * PARKED_WRITE_MARGIN, abs=1e-6)
    await s.until(lambda: len(s.codes()) == 536, timeout=5)
    assert s.codes() == [INVALID] * 536 and gate.holding == 64 and s.responder.parked == 0
    assert s.responder._write_cost < 2e-4  # the write of those answers pulled the cost down


async def test_memory_stays_bounded_in_a_storm(served):
    """Groups beyond max_pending wait in the kernel; once they have waited unread for a quarter of
    their deadline, reads resume and shed what does not fit: iopfd never holds more than max_pending
    for a per-group policy (a batch policy's parked groups are bounded too: the state machine test)."""
    gate = Gate()
    s = served(gate, max_pending=64, response_deadline=0.4)
    for _ in range(20):
        s.report(500)
        await s.until(lambda: s.emulated.undelivered == 0)
        assert s.responder.pending <= 64  # a per-group policy parks none
    await s.settle()
    outcomes = s.responder.stats.outcomes
    assert len(s.codes()) == 10000 and outcomes["shed"] + outcomes["deadline"] == 10000 and outcomes["shed"]


async def test_beyond_max_pending_groups_wait_in_the_kernel_while_decisions_make_room():
    """A policy that answers a moment later (a peer) sheds nothing: reading pauses while a whole
    read would not fit under max_pending, and resumes as answers make room."""

    class Soon(Policy):
        async def decide(self, group):
            await asyncio.sleep(0.001)
            return SUCCESS

    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=16), Soon(),
                               QueueConfig("q", max_pending=64, response_deadline=5))
    responder.start()
    for i in range(1000):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * (i + 1), grpid=i % 512))
    async with asyncio.timeout(10):
        while emulated.undelivered or responder.pending:
            assert responder.pending <= 64
            await asyncio.sleep(0.001)
    assert [code for _, code in emulated.answers] == [SUCCESS] * 1000
    assert responder.stats.outcomes["shed"] == 0
    await responder.stop(0)
    emulated.close()


async def test_a_refused_response_is_skipped_and_counted_the_rest_written(served):
    gate = Gate()
    s = served(gate, response_deadline=30)
    s.report(2, dev_id=1)
    s.report(2, dev_id=2)
    s.report(2, dev_id=1, start=2)
    await s.until(lambda: len(gate.waiting) == 6)
    s.emulated.detach(2)  # the kernel answers dev 2's read groups itself
    assert s.codes() == [INVALID, INVALID]
    with capture_logs() as logs:
        gate.release(SUCCESS)  # one write of 6 responses; entries 2 and 3 are refused
        await s.settle()
    assert s.codes() == [INVALID, INVALID] + [SUCCESS] * 4
    assert s.responder.stats.write_errors == 2
    assert sum("refused" in entry["event"] for entry in logs) == 2


class Crafted(FaultQueue):
    """Returns the given reads (records the kernel may or may never produce), then nothing; its fd
    is readable while reads are left, as a fault fd is while groups are queued."""

    def __init__(self, emulated: EmulatedFaultQueue, *reads: bytes) -> None:
        super().__init__(None, 0, os.eventfd(1 if reads else 0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.reads, self.writes = list(reads), []

    def _readinto(self, buffer):
        data = self.reads.pop(0) if self.reads else b""
        if data and not self.reads:
            os.eventfd_read(self.fd)  # nothing left: no longer readable
        buffer[:len(data)] = data
        return len(data)

    def _write(self, data):
        self.writes.append(bytes(data))
        return len(data)

    @property
    def written(self) -> list[int]:
        return [cookie for data in self.writes for cookie, _ in RESPONSE.iter_unpack(data)]


def record(cookie: int, last: bool = True) -> bytes:
    return RECORD.pack(LAST_PAGE if last else 0, 1, 0, 0, 1, 0, 0x1000, 0, cookie)


async def test_malformed_groups_are_answered_invalid():
    emulated = EmulatedFaultQueue()
    source = Crafted(emulated, record(3, last=False) + record(4) + record(5) + record(0) + record(6, last=False))
    responder = QueueResponder(source, FixedPolicy("accept", SUCCESS), QueueConfig("q"))
    responder.start()
    with capture_logs() as logs:
        responder._on_readable()
        await asyncio.sleep(0.01)
    assert sorted(source.written) == [3, 4, 5, 6]
    assert responder.stats.outcomes == {"success": 1, "invalid": 0, "deadline": 0, "shed": 0, "error": 3}
    assert sum(entry["event"].startswith("malformed") for entry in logs) == 4  # incl. cookie 0
    await responder.stop(0)
    emulated.close()


async def test_max_pending_unless_configured_is_the_default_for_the_policy_kind():
    """Two whole reads for a policy that decides batches or gives fixed answers; a per-group decide()
    gets fewer, and a reload to another kind of policy changes it; a configured value always holds."""
    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(), FixedPolicy("accept", SUCCESS), QueueConfig("q"))
    assert responder.max_pending == MAX_PENDING == 2 * responder.source.buffer_records
    responder.use_policy(Gate())
    assert responder.max_pending == PER_GROUP_MAX_PENDING < MAX_PENDING
    responder.use_policy(BatchGate())
    assert responder.max_pending == MAX_PENDING
    configured = QueueResponder(emulated.open(), Gate(), QueueConfig("q2", max_pending=10))
    assert configured.max_pending == 10
    configured.use_policy(BatchGate())
    assert configured.max_pending == 10
    emulated.close()


class CountedAccept(FixedPolicy):
    def __init__(self) -> None:
        super().__init__("accept", SUCCESS)
        self.batches = 0

    async def decide(self, group):
        self.batches += 1
        return await super().decide(group)


@pytest.mark.parametrize(("policy", "code", "outcome"), [(CountedAccept, SUCCESS, "success"),
                                                         (lambda: FixedPolicy("reject", INVALID), INVALID, "invalid")])
async def test_a_fixed_answer_is_written_straight_from_the_cookie_column_of_each_read(policy, code, outcome):
    emulated = EmulatedFaultQueue()
    source = Crafted(emulated, record(7) + record(3) + record(9), record(4))
    responder = QueueResponder(source, policy(), QueueConfig("q"))
    marks = []
    responder.cookie_mark_hook = lambda cookie: marks.append(cookie) or cookie
    responder.start()
    # Each read's answers are written in one write(), in the wakeup that read it (one read a wakeup).
    responder._on_readable()
    assert source.writes == [RESPONSE.pack(7, code) + RESPONSE.pack(3, code) + RESPONSE.pack(9, code)]
    responder._on_readable()
    assert source.writes[1:] == [RESPONSE.pack(4, code)]
    assert responder.pending == 0
    assert getattr(responder.policy, "batches", 0) == 0  # the policy was never called
    assert responder.stats.outcomes[outcome] == 4 and responder.stats.faults == 4 and responder.stats.latency.count == 4
    assert responder.stats.read_batches.counts[0] == 1 and responder.stats.read_batches.sum == 4
    # Cookies are the lowest free: a read's are at most the groups pending before it plus its own
    # (the first read's 3), and the second read's 1 stays below that mark.
    assert marks == [3]
    await responder.stop(0)
    emulated.close()


async def test_a_fixed_answer_takes_the_batch_path_for_multi_record_groups_and_answers_in_the_same_turn():
    """Read 1 has a two-record group: the cookie column alone cannot answer it, so it takes the batch
    path, and is still answered in the turn that read it, before read 2 (which reuses cookie 5)."""
    emulated = EmulatedFaultQueue()
    source = Crafted(emulated, record(5, last=False) + record(5), record(5) + record(6))
    policy = CountedAccept()
    responder = QueueResponder(source, policy, QueueConfig("q"))
    responder.start()
    responder._on_readable()
    assert source.writes == [RESPONSE.pack(5, SUCCESS)]
    responder._on_readable()
    assert source.writes[1:] == [RESPONSE.pack(5, SUCCESS) + RESPONSE.pack(6, SUCCESS)]
    assert policy.batches == 0 and responder.pending == 0
    assert responder.stats.outcomes["success"] == 3 and responder.stats.outcomes["error"] == 0
    assert responder.stats.faults == 4
    await responder.stop(0)
    emulated.close()


async def test_stop_gives_policies_grace_then_answers_the_rest(served):
    class SlowThenHang(Policy):
        async def decide(self, group):
            await asyncio.sleep(0.02 if group.dev_id == 1 else 3600)
            return SUCCESS

    s = served(SlowThenHang(), response_deadline=30, deadline_code=INVALID)
    s.report(3, dev_id=1)
    s.report(2, dev_id=2)
    await s.until(lambda: s.emulated.undelivered == 0)
    await s.responder.stop(0.5)
    assert sorted((group[0].dev_id, code) for group, code in s.emulated.answers) == \
        [(1, SUCCESS)] * 3 + [(2, INVALID)] * 2
    assert s.emulated.pending_cookies == [] and s.responder.pending == 0
    s.report(1)  # not read any more
    await asyncio.sleep(0.01)
    assert s.emulated.undelivered == 1


async def test_rules_route_groups_and_a_hanging_sub_policy_delays_only_its_groups(served):
    gate = Gate()
    policies = Policies({"r": ("rules", {"rules": [{"dev_id": [1], "policy": "gate"},
                                                   {"dev_id": [2], "policy": "accept"}],
                                         "default": "reject"})})
    policies._built["gate"] = gate  # a test double standing in for a named policy
    s = served(policies.get("r"), response_deadline=30)
    s.report(2, dev_id=1)
    s.report(2, dev_id=2)
    s.report(1, dev_id=3)
    await s.until(lambda: len(s.codes()) == 3)
    assert sorted((group[0].dev_id, code) for group, code in s.emulated.answers) == \
        [(2, SUCCESS), (2, SUCCESS), (3, INVALID)]
    gate.release(INVALID)
    await s.settle()
    assert s.responder.stats.outcomes["invalid"] == 3 and s.responder.stats.outcomes["success"] == 2


async def test_one_engine_serves_many_named_queues():
    engine = Engine()
    queues = {name: EmulatedFaultQueue() for name in ("vm1", "vm2")}
    for name, emulated in queues.items():
        policy = FixedPolicy("accept", SUCCESS) if name == "vm1" else FixedPolicy("reject", INVALID)
        engine.add(QueueResponder(emulated.open(), policy,
                               QueueConfig(name)))
    with pytest.raises(ValueError, match="already served"):
        engine.add(QueueResponder(queues["vm1"].open(), FixedPolicy("accept", SUCCESS), QueueConfig("vm1")))
    assert not engine.reading
    engine.start()
    assert engine.reading
    for i, emulated in enumerate(queues.values()):
        for n in range(5 + i):
            emulated.report(PageRequest(dev_id=n, addr=0x1000, pasid=n, grpid=n))
    async with asyncio.timeout(5):
        while engine.totals()["success"] + engine.totals()["invalid"] < 11:
            await asyncio.sleep(0.001)
    await engine.stop(0)
    assert engine.totals() == {"pending": 0, "faults": 11, "success": 5, "invalid": 6, "deadline": 0,
                               "shed": 0, "error": 0, "vevents": 0, "vevents_lost": 0}
    assert [code for _, code in queues["vm2"].answers] == [INVALID] * 6
    for emulated in queues.values():
        emulated.close()


@pytest.mark.parametrize("errno_", [errno.EBADF, errno.EIO])
async def test_a_fault_fd_that_fails_stops_only_its_own_queue(errno_):
    """A read error (the fd closed under the daemon, a device gone bad) marks that queue failed and
    logs why; the engine's other queues are served on, and the groups already read get answered."""

    class Failing(Crafted):
        def _readinto(self, buffer):  # the fd stays readable (poll() reports an fd in error so)
            if not self.reads:
                raise OSError(errno_, os.strerror(errno_))
            data = self.reads.pop(0)
            buffer[:len(data)] = data
            return len(data)

    emulated = EmulatedFaultQueue()
    bad = Failing(emulated, record(7) + record(8))
    engine = Engine()
    engine.add(QueueResponder(bad, FixedPolicy("accept", SUCCESS), QueueConfig("bad")))
    good = EmulatedFaultQueue()
    engine.add(QueueResponder(good.open(), FixedPolicy("accept", SUCCESS), QueueConfig("good")))
    with capture_logs() as logs:
        engine.start()
        engine.queues["bad"]._on_readable()
        for i in range(10):
            good.report(PageRequest(dev_id=1, addr=0x1000 * (i + 1)))
        async with asyncio.timeout(5):
            while len(good.answers) < 10:
                await asyncio.sleep(0.001)
    failed = engine.queues["bad"]
    assert failed.failure and os.strerror(errno_) in failed.failure and not failed.reading
    assert sorted(bad.written) == [7, 8]  # what it read before failing is still answered
    assert any(e["event"] == "fault queue no longer served" and e["queue"] == "bad" for e in logs)
    assert engine.queues["good"].reading and engine.queues["good"].failure is None
    await engine.stop(0)
    emulated.close()
    good.close()
