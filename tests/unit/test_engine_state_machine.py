"""Any interleaving of faults, detaches, decisions, failures and deadlines: every group read is answered
exactly once, pending stays bounded, and stopping leaves nothing pending in the (emulated) kernel."""

from __future__ import annotations

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from iopfd.engine import Batch, BatchPolicy, Policy, QueueConfig, QueueResponder
from iopfd.engine.queue import PARKED_FACTOR
from iopfd.iommufd import INVALID, SUCCESS
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

MAX_PENDING = 6
DEADLINE = 0.03


class Scripted(Policy):
    """Each call waits until the state machine decides it: a code, garbage, an exception, or never."""

    name = "scripted"

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future] = []

    async def decide(self, group):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        outcome = await future
        if outcome == "raise":
            raise RuntimeError("scripted failure")
        return outcome


class ScriptedBatches(BatchPolicy):
    """Takes each batch and answers parts of it when the state machine says so (or never)."""

    name = "scripted-batches"

    def __init__(self) -> None:
        self.waiting: list[Batch] = []

    def decide_batch(self, batch):
        self.waiting.append(batch)
        return None


class EngineMachine(RuleBasedStateMachine):
    make_policy = Scripted

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.emulated = EmulatedFaultQueue()
        self.policy = self.make_policy()
        self.responder = QueueResponder(self.emulated.open(batch_records=4), self.policy,
                                  QueueConfig("sm", response_deadline=DEADLINE, max_pending=MAX_PENDING))
        self.loop.run_until_complete(self._run(self.responder.start))
        self.grpid = 0

    async def _run(self, function, *args):
        return function(*args)

    def _turns(self, count: int = 4) -> None:
        for _ in range(count):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(dev_id=st.integers(1, 3), records=st.integers(1, 6), groups=st.integers(1, 5))
    def fault(self, dev_id, records, groups):
        for _ in range(groups):
            self.grpid += 1
            for i in range(records):
                self.emulated.report(PageRequest(dev_id=dev_id, addr=0x1000 * i, grpid=self.grpid,
                                                 last=i == records - 1))

    @rule(dev_id=st.integers(1, 3))
    def detach(self, dev_id):
        self.emulated.detach(dev_id)

    @rule(outcome=st.sampled_from([SUCCESS, INVALID, 7, None, "raise"]), which=st.integers(0, 100),
          part=st.integers(1, 8))
    def decide(self, outcome, which, part):
        if isinstance(self.policy, ScriptedBatches):
            if self.policy.waiting:
                batch = self.policy.waiting[which % len(self.policy.waiting)]
                if outcome in (SUCCESS, INVALID, 7):  # a part of the batch, perhaps again
                    batch.answer(slice(0, part), outcome)
            return
        waiting = [future for future in self.policy.waiting if not future.done()]
        if waiting:
            waiting[which % len(waiting)].set_result(outcome)

    @rule(count=st.integers(1, 8))
    def run_loop(self, count):
        self._turns(count)

    @rule()
    def pass_the_deadline(self):
        self.loop.run_until_complete(asyncio.sleep(DEADLINE * 1.5))

    @invariant()
    def pending_is_bounded(self):
        """At most max_pending groups are with the policy; those read beyond wait parked, up to
        PARKED_FACTOR times more, and every one of them is still open."""
        responder = self.responder
        assert responder.deciding - responder.parked <= MAX_PENDING
        assert responder.deciding <= MAX_PENDING * (1 + PARKED_FACTOR)
        assert 0 <= responder.parked == sum(int(b.read.open[b.index].sum()) for b in responder._parked)

    @invariant()
    def every_group_read_is_pending_or_answered_once(self):
        stats = self.responder.stats
        read = int(stats.read_batches.sum)
        assert sum(stats.outcomes.values()) + self.responder.pending == read
        # The kernel side agrees: what the daemon has not answered is exactly what it still holds
        # (or what a detach answered for it).
        assert len(self.emulated.pending_cookies) <= self.responder.pending

    def teardown(self):
        try:
            self.loop.run_until_complete(self.responder.stop(0))
            assert self.emulated.pending_cookies == [], "a group read was left unanswered"
            stats = self.responder.stats
            assert sum(stats.outcomes.values()) == stats.read_batches.sum
            assert stats.write_errors <= len([1 for _, code in self.emulated.answers if code == INVALID])
        finally:
            self.loop.close()
            self.emulated.close()


class BatchEngineMachine(EngineMachine):
    make_policy = ScriptedBatches


EngineMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
BatchEngineMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_engine_state_machine = EngineMachine.TestCase
test_engine_state_machine_with_batches = BatchEngineMachine.TestCase
