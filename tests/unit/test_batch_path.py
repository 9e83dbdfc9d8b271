"""The columnar decision path: columns equal the records, rules route a batch exactly as each rule
matches one group, per-group decide() costs a task only when it really awaits, and at most
MAX_AWAITING such calls are in flight while the rest wait inside their deadline."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iopfd.engine import BatchPolicy, FixedPolicy, Policy, QueueConfig, QueueResponder, RoutingPolicy
from iopfd.engine.batch import batch_of, record_dtype
from iopfd.engine.queue import MAX_AWAITING
from iopfd.iommufd import INVALID, SUCCESS
from iopfd.iommufd.fault import LAST_PAGE, PASID_VALID, RECORD, FaultGroup
from iopfd.policies import Rule, RulesPolicy
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

u32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 7, 100])
addresses = st.integers(0, 2**64 - 1) | st.sampled_from([0, 0x1000, 0x7FFF_FFFF, 0x8000_0000, 2**64 - 1])


@st.composite
def groups(draw) -> FaultGroup:
    size = draw(st.integers(1, 3))
    dev_id, pasid, valid = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([0, 5, 9])), draw(st.booleans())
    cookie = draw(st.integers(1, 2**32 - 1))
    records = b"".join(RECORD.pack((PASID_VALID if valid else 0) | (LAST_PAGE if i == size - 1 else 0), dev_id, pasid,
                                   draw(u32), draw(st.integers(0, 15)), 0, draw(addresses), 0, cookie)
                       for i in range(size))
    return FaultGroup(cookie, records, draw(st.sampled_from(["vm1", "vm2"])))


rules = st.builds(
    Rule,
    dev_id=st.none() | st.lists(st.sampled_from([1, 2, 3]), min_size=1),
    pasid=st.none() | st.lists(st.sampled_from([0, 5, 9, "none"]), min_size=1),
    address=st.none() | st.tuples(addresses, addresses).filter(lambda r: r[0] < r[1])
    | st.sampled_from([(0, 0x8000_0000), (0x1000, 2**64)]),
    perm=st.none() | st.lists(st.sampled_from(["read", "write", "exec", "priv"]), min_size=1),
    queue=st.none() | st.lists(st.sampled_from(["vm1", "vm2"]), min_size=1),
    policy=st.just("x"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=12), st.lists(rules, max_size=4), st.data())
def test_rules_route_a_batch_as_each_rule_matches_each_group(batch_groups, rule_list, data):
    targets = [FixedPolicy(f"t{i}", SUCCESS) for i in range(len(rule_list))]
    policy = RulesPolicy("r", list(zip(rule_list, targets)), FixedPolicy("reject", INVALID))
    for sub in {group.queue for group in batch_groups}:  # a batch is one queue's read
        one_queue = [group for group in batch_groups if group.queue == sub]
        route = numpy.broadcast_to(policy.route(batch_of(one_queue)), (len(one_queue),))  # or one for all
        assert [policy.targets[i] for i in route.tolist()] == [policy.select(group) for group in one_queue]


@settings(max_examples=100, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=12))
def test_the_columns_are_the_groups_fields(batch_groups):
    batch_groups = [FaultGroup(group.cookie, group.records, "vm1") for group in batch_groups]  # one queue's read
    batch = batch_of(batch_groups)
    assert batch.cookie.tolist() == [group.cookie for group in batch_groups]
    assert batch.dev_id.tolist() == [group.dev_id for group in batch_groups]
    assert batch.perm.tolist() == [group.perm for group in batch_groups]
    assert batch.pasid_valid.tolist() == [group.pasid_valid for group in batch_groups]
    assert batch.addr_min.tolist() == [min(group.addresses) for group in batch_groups]
    assert batch.addr_max.tolist() == [max(group.addresses) for group in batch_groups]
    assert batch.fault_count.tolist() == [group.fault_count for group in batch_groups]
    some = numpy.arange(0, len(batch), 2)
    assert batch.take(some).records().tobytes() == b"".join(batch_groups[i].records for i in some.tolist())
    assert [batch.group(i) for i in range(len(batch))] == batch_groups


def test_the_record_dtype_is_the_records_layout():
    values = (LAST_PAGE | PASID_VALID, 2, 3, 4, 5, 6, 0x1122334455667788, 9, 10)
    (record,) = numpy.frombuffer(RECORD.pack(*values), record_dtype())
    assert tuple(int(value) for value in record) == values


def served(policy: Policy, **config) -> tuple[EmulatedFaultQueue, QueueResponder]:
    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(), policy, QueueConfig("q", **config))
    responder.start()
    return emulated, responder


async def settle(emulated: EmulatedFaultQueue, responder: QueueResponder) -> None:
    async with asyncio.timeout(10):
        while emulated.undelivered or responder.pending:
            await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_rules_over_fixed_answers_answer_each_group_of_a_mixed_read_by_its_rule():
    rules = RulesPolicy("by-device", [(Rule(dev_id=[1], policy="accept"), FixedPolicy("accept", SUCCESS))],
                        FixedPolicy("reject", INVALID))
    emulated, responder = served(rules)
    for i in range(500):
        emulated.report(PageRequest(dev_id=1 + i % 2, addr=0x1000 * i, grpid=i % 512))
    await settle(emulated, responder)
    assert len(emulated.answers) == 500
    assert all(code == (SUCCESS if group[-1].dev_id == 1 else INVALID) for group, code in emulated.answers)
    outcomes = responder.stats.outcomes
    assert (outcomes["success"], outcomes["invalid"], outcomes["error"]) == (250, 250, 0)
    await responder.stop(0)
    emulated.close()


class ByRoute(RoutingPolicy):
    """A third-party routing policy: returns what it is given, one index for all or one per group."""

    def __init__(self, route) -> None:
        super().__init__("by-route")
        self.targets = [FixedPolicy("accept", SUCCESS), FixedPolicy("reject", INVALID)]
        self.given = route

    def route(self, batch):
        return self.given(batch)


@pytest.mark.asyncio
@pytest.mark.parametrize(("route", "codes", "errors"), [
    (lambda batch: 1, [INVALID] * 6, 0),  # one index for the whole batch
    (lambda batch: numpy.arange(len(batch)) % 2, [SUCCESS, INVALID] * 3, 0),
    (lambda batch: 2, [INVALID] * 6, 6),  # no such target: every group an error
    (lambda batch: numpy.full(len(batch), -1), [INVALID] * 6, 6),
    (lambda batch: numpy.zeros(len(batch) + 1, int), [INVALID] * 6, 6),  # not one per group
])
async def test_a_routing_policy_sends_each_group_to_its_target_and_a_bad_route_answers_invalid(route, codes, errors):
    emulated, responder = served(ByRoute(route))
    for i in range(6):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i))
    await settle(emulated, responder)
    assert [code for _, code in sorted(emulated.answers, key=lambda answer: answer[0][-1].addr)] == codes
    assert responder.stats.outcomes["error"] == errors
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
async def test_a_decide_that_never_awaits_costs_no_task():
    class Immediate(Policy):
        async def decide(self, group):
            return SUCCESS if group.dev_id == 1 else INVALID

    created = []
    loop = asyncio.get_running_loop()
    loop.set_task_factory(lambda loop, coro, **kw: created.append(coro) or asyncio.Task(coro, loop=loop, **kw))
    try:
        emulated, responder = served(Immediate())
        for i in range(500):
            emulated.report(PageRequest(dev_id=1 + i % 2, addr=0x1000 * i, grpid=i % 512))
        await settle(emulated, responder)
    finally:
        loop.set_task_factory(None)
    assert sorted(code for _, code in emulated.answers) == [SUCCESS] * 250 + [INVALID] * 250
    assert [coro for coro in created if "_finish" in repr(coro)] == []
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
async def test_per_group_calls_that_await_are_bounded_and_the_rest_wait_inside_their_deadline():
    in_flight, most = 0, 0

    class Slow(Policy):
        async def decide(self, group):
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return SUCCESS

    emulated, responder = served(Slow(), response_deadline=5)
    for i in range(3 * MAX_AWAITING):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=i % 512))
    await settle(emulated, responder)
    assert most == MAX_AWAITING
    assert [code for _, code in emulated.answers] == [SUCCESS] * (3 * MAX_AWAITING)
    assert responder.stats.outcomes["deadline"] == 0
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
async def test_groups_waiting_for_a_turn_get_the_deadline_code_in_time():
    class Never(Policy):
        async def decide(self, group):
            await asyncio.sleep(3600)

    emulated, responder = served(Never(), response_deadline=0.1, deadline_code=SUCCESS)
    for i in range(MAX_AWAITING + 50):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=i % 512))
    await settle(emulated, responder)
    assert responder.stats.outcomes["deadline"] == MAX_AWAITING + 50
    assert responder.stats.latency.sum / (MAX_AWAITING + 50) < 0.5
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
async def test_time_spent_unread_counts_against_the_deadline():
    """Reads of two groups; deciding the first group blocks the loop for 0.2 s while more groups wait
    unread in the kernel. Their clock started at the readiness that was seen, so when they are read
    they are already past the 0.1 s deadline and get the deadline code at once."""

    class BlocksOnce(Policy):
        blocked = False

        async def decide(self, group):
            if not self.blocked:
                self.blocked = True
                time.sleep(0.2)
            return INVALID

    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=2), BlocksOnce(),
                         QueueConfig("q", response_deadline=0.1, deadline_code=SUCCESS))
    responder.start()
    for i in range(20):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=i))
    await settle(emulated, responder)
    # The first wakeup reads four reads (8 groups) before any decision starts; the 12 groups still
    # unread when the loop comes back are past their deadline when read.
    codes = [code for _, code in emulated.answers]
    assert len(codes) == 20 and codes[0] == INVALID and codes.count(SUCCESS) >= 12
    assert responder.stats.outcomes["deadline"] >= 12
    assert responder.stats.unread_wait.sum >= 12 * 0.2 and responder.stats.unread_wait.count == 20
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
async def test_a_stream_that_never_leaves_the_queue_empty_at_a_read_is_timed_from_each_emptying_read():
    """A stream: while each read is decided (20 ms, holding the loop) the next group arrives, so no
    read ever returns nothing. Each read still empties the kernel's queue (short, and the fd not
    readable right after it), so the next group's clock starts at that read, not at the stream's
    first readiness: all 20 groups, 0.4 s of stream against a 0.25 s deadline, are decided in time."""

    class Stream(BatchPolicy):
        def decide_batch(self, batch):
            time.sleep(0.02)  # holds the loop, as a decided read does in the TCG lab ...
            self.batches += 1
            if self.batches < 20:  # ... while the next group arrives
                emulated.report(PageRequest(dev_id=1, addr=0x1000 * (self.batches + 1)))
            return numpy.full(len(batch), SUCCESS, numpy.uint32)

    emulated = EmulatedFaultQueue()
    policy = Stream("stream")
    policy.batches = 0
    responder = QueueResponder(emulated.open(), policy, QueueConfig("q", response_deadline=0.25))
    responder.start()
    emulated.report(PageRequest(dev_id=1, addr=0x1000))
    await settle(emulated, responder)
    assert [code for _, code in emulated.answers] == [SUCCESS] * 20 and policy.batches == 20
    assert responder.stats.outcomes["deadline"] == 0
    assert responder.stats.latency.sum < 20 * 0.1  # each from its emptying read, not from the first
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
async def test_after_the_queue_was_idle_a_group_is_timed_from_its_own_readiness():
    """The first group is answered and the queue stays empty; a group raised 0.3 s later, past the
    0.25 s deadline, is timed from its own readiness and decided, not answered at once."""
    emulated, responder = served(RulesPolicy("r", [], FixedPolicy("accept", SUCCESS)), response_deadline=0.25)
    emulated.report(PageRequest(dev_id=1, addr=0x1000))
    await settle(emulated, responder)
    await asyncio.sleep(0.3)
    emulated.report(PageRequest(dev_id=1, addr=0x2000))
    await settle(emulated, responder)
    assert [code for _, code in emulated.answers] == [SUCCESS, SUCCESS]
    assert responder.stats.outcomes["deadline"] == 0
    await responder.stop(0)
    emulated.close()


class Immediate(Policy):
    """Loaded by its import path in the test below."""

    async def decide(self, group):
        return SUCCESS


def test_a_policy_type_can_be_a_class_by_its_import_path():
    from iopfd.policies import Policies, PolicyError

    policy = Policies({"p": ("test_batch_path:Immediate", {})}).get("p")
    assert type(policy).__name__ == "Immediate" and policy.name == "p"
    for path, message in [("no_such_module:X", "ModuleNotFoundError"), ("test_batch_path:Missing", "AttributeError"),
                          ("test_batch_path:settle", "not a subclass of iopfd.policies.Policy")]:
        with pytest.raises(PolicyError) as info:
            Policies({"p": (path, {})}).get("p")
        ((where, text),) = info.value.lines
        assert where == "policies.p.type" and message in text


@pytest.mark.asyncio
async def test_a_storm_of_shed_groups_logs_a_line_a_second_not_a_line_a_read():
    from structlog.testing import capture_logs

    class Never(Policy):
        async def decide(self, group):
            await asyncio.sleep(3600)

    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=8), Never(),
                               QueueConfig("q", max_pending=8, response_deadline=0.4))
    with capture_logs() as logs:
        responder.start()
        for i in range(800):
            emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=i % 512))
        async with asyncio.timeout(10):
            while emulated.undelivered:
                await asyncio.sleep(0.001)
    shed_lines = [entry for entry in logs if entry["event"].startswith("queue full")]
    assert responder.stats.outcomes["shed"] == 792 and 1 <= len(shed_lines) <= 2  # a per-group policy parks none
    assert shed_lines[0]["groups"] >= 8
    await responder.stop(0)
    emulated.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("block", [0.0, 0.6])
async def test_a_full_queue_leaves_groups_in_the_kernel_until_they_have_waited_a_quarter_of_their_deadline(block):
    """While no whole read fits under max_pending, reading pauses and the groups wait in the kernel
    for decisions to make room. When the first decision blocks the loop for 0.6 s of a 1 s deadline,
    the groups left in the kernel have waited over a quarter of their deadline: the queue reads until
    the kernel's queue is empty, shedding what exceeds max_pending (a per-group policy parks none),
    before any of them is past it."""

    class Hangs(Policy):
        blocked = False

        async def decide(self, group):
            if not self.blocked:
                self.blocked = True
                time.sleep(block)
            await asyncio.sleep(3600)

    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=8), Hangs(),
                         QueueConfig("q", response_deadline=1.0, max_pending=16))
    for i in range(400):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i, grpid=i % 512))
    responder.start()
    await asyncio.sleep(0.15)
    if block:
        async with asyncio.timeout(2):
            while emulated.undelivered:
                await asyncio.sleep(0.01)
        assert responder.stats.outcomes["shed"] == 400 - 16 and responder.stats.outcomes["deadline"] == 0
    else:
        assert emulated.undelivered == 400 - 16 and responder.stats.outcomes["shed"] == 0
    await responder.stop(0)
    emulated.close()


STORM_IMPORTS_NOTHING = """
import asyncio, sys
from iopfd.engine import Policy, QueueConfig, QueueResponder
from iopfd.iommufd import SUCCESS
from iopfd.iommufd.fault import LAST_PAGE, RECORD
from iopfd.service.logging import configure_logging
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

configure_logging("error")

class Slow(Policy):
    async def decide(self, group):
        await asyncio.sleep(0.001)
        return SUCCESS

async def main():
    emulated = EmulatedFaultQueue()
    responder = QueueResponder(emulated.open(batch_records=64), Slow(),
                               QueueConfig("q", response_deadline=0.3, max_pending=100))
    before = set(sys.modules)
    for i in range(3000):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * (i + 1), grpid=i % 512))
    responder.start()
    async with asyncio.timeout(20):
        while emulated.undelivered or responder.pending:
            await asyncio.sleep(0.01)
    # a malformed read (a group without its LAST_PAGE record) takes the other path of split_groups
    from iopfd.engine.batch import split_groups, record_dtype
    import numpy
    raw = RECORD.pack(0, 1, 0, 0, 0, 0, 0x1000, 0, 7) + RECORD.pack(LAST_PAGE, 1, 0, 0, 0, 0, 0x2000, 0, 8)
    split_groups(numpy.frombuffer(raw, record_dtype()))
    await responder.stop(0)
    outcomes = responder.stats.outcomes
    assert outcomes["success"] and outcomes["shed"] + outcomes["deadline"], outcomes
    print(sorted(set(sys.modules) - before - {"iopfd.engine.batch"}))

asyncio.run(main())
"""


def test_serving_a_storm_imports_nothing():
    """No module is imported while groups are served: a lazy import (numpy.unique's first call
    imports numpy.ma) stalled the loop for half a second in the TCG lab, mid-storm, and every group
    left in the kernel missed its deadline. A storm of per-group decisions that sheds, misses
    deadlines and gets cookies reissued, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", STORM_IMPORTS_NOTHING], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
