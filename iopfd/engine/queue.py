"""One fault queue served end to end: read() -> groups -> policy -> answer -> one write() per loop turn.

A fault's path, top to bottom of this file: ``_on_readable`` reads whole groups when the event loop
says the fd is readable. With a policy whose answer is fixed (accept, reject) and nothing else
pending, ``_answer_read`` answers the whole read at once from its cookie column. Otherwise
``_admit`` sheds what exceeds ``max_pending`` and hands the rest to the policy; ``_decided`` (the policy's answer), ``_on_deadline`` (no answer in time) or ``stop`` (the
daemon is exiting) answers the group exactly once; ``_flush`` writes every answer of the loop turn
in one write() and skips exactly the entries the kernel refuses.

Invariant: every group read is in ``_pending`` until answered (``_answer_read`` skips this step),
then in ``_outgoing`` until written.
Entries, not cookies, identify groups: the kernel reuses a cookie as soon as it is answered, so a
late decision for an abandoned group must never answer the new group that got its cookie.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from iopfd.engine.policy import Policy
from iopfd.engine.stats import QueueStats
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.fault import (
    INVALID, LAST_PAGE, RECORD, RESPONSE, SUCCESS, FaultGroup, FaultQueue, assemble_groups, respond_packed,
)

log = structlog.get_logger("iopfd.engine")

# Reads per readiness callback before yielding to the loop, so one flooding queue cannot starve the
# others or its own policies (readiness is level-triggered: the loop calls back at once if more is
# queued). A wakeup also ends once max_pending groups await a decision: a burst is shed only when
# the policy has had its turn and is still behind, not because it arrived in one read.
MAX_READS_PER_WAKEUP = 4
# ... and once this many groups went to policies (a task each for per-group ones): with 4 096 per
# wakeup the storm bench saw deadline timers fire over 50 ms late under TCG; with 1 024, never.
MAX_ADMITTED_PER_WAKEUP = 1024
# Deleting every byte with the LAST_PAGE bit from a read's flag bytes leaves nothing exactly when
# every record is a whole one-record group (what a PRI device sends for single-page faults).
_WITH_LAST_PAGE = bytes(b for b in range(256) if b & LAST_PAGE)
_RECORD_WORDS = RECORD.size // 4
_COOKIE_WORD = 9  # struct iommu_hwpt_pgfault.cookie, the last u32
# Timers may fire a hair early; answering 100 µs early is well inside any deadline.
DEADLINE_SLACK = 1e-4
# Routing policies (rules) may select other routing policies; the config forbids cycles.
MAX_ROUTING_DEPTH = 16
# How long stop() waits for cancelled policy tasks to unwind.
CANCEL_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str
    response_deadline: float = 1.0
    deadline_code: int = INVALID
    max_pending: int = 4096
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. the VM's name, in every log line
    device_names: Mapping[int, str] = field(default_factory=dict)  # dev_id -> name, in per-group lines


class _Pending:
    """A group read and not yet answered; ``task`` is the policy call deciding it."""

    __slots__ = ("group", "read_at", "task", "batched")

    def __init__(self, group: FaultGroup, read_at: float) -> None:
        self.group = group
        self.read_at = read_at
        self.task: asyncio.Task | None = None
        self.batched = False  # the task decides other groups too


class QueueServer:
    """Serves one fault queue (any number of HWPTs, devices and PASIDs) with one policy."""

    def __init__(self, source: FaultQueue, policy: Policy, config: QueueConfig) -> None:
        self.source = source
        self.policy = policy
        self.config = config
        self.name = config.name
        self.stats = QueueStats()
        self.failure: str | None = None  # why the queue stopped being served, if it did
        self._pending: dict[int, _Pending] = {}
        # Answers not yet written, as runs sharing an outcome and read time: (responses, count, outcome, read_at)
        self._outgoing: list[tuple[bytes | bytearray, int, str, float]] = []
        self._outgoing_count = 0
        # A policy whose answer never depends on the group (accept, reject): see _answer_read.
        self._fixed_code: int | None = getattr(policy, "fixed_code", None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._drained: asyncio.Event | None = None
        self._log = log.bind(queue=self.name, **config.labels)
        # Called with a cookie above every one seen so far, before the group is decided; returns the
        # new mark. The service records it so a restart can sweep what a crash left unanswered.
        self.cookie_mark_hook: Callable[[int], int] | None = None
        self.cookie_mark = 0
        self._log_groups = _debug_enabled()

    def use_policy(self, policy: Policy) -> None:
        """Decide the groups read from now on with ``policy`` (a config reload); those already read
        finish with the one that has them."""
        self.policy = policy
        self._fixed_code = getattr(policy, "fixed_code", None)

    @property
    def reading(self) -> bool:
        return self._reading

    @property
    def pending(self) -> int:
        """Groups read and not yet written back."""
        return len(self._pending) + self._outgoing_count

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.source.fileno(), self._on_readable)
        self._reading = True
        self._log.info("serving fault queue", fd=self.source.fileno(), policy=self.policy.name,
                       response_deadline=self.config.response_deadline, max_pending=self.config.max_pending)

    def stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.source.fileno())
            self._reading = False

    # -- read ----------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        admitted = 0
        for attempt in range(MAX_READS_PER_WAKEUP):
            # Write answers already made first: once a group is auto-answered by a detach, its cookie
            # can come back with a new group in the very next read, and a stale answer must never
            # reach that one. (So answers go out in one write() per read, like the C floor's.)
            self._flush()
            if admitted >= MAX_ADMITTED_PER_WAKEUP or (attempt and len(self._pending) >= self.config.max_pending):
                return  # let the policies catch up first; shed only if they still have not next time
            try:
                # Only the first read of a wakeup can meet an old 6.12 kernel's "0 bytes but POLLIN".
                data = self.source.read_raw(confirm_empty=attempt == 0)
            except IommufdError as exc:
                self._fail(f"cannot read the fault fd: {exc}")
                return
            if not data:
                return
            now = self._loop.time()
            if self.stats.first_read is None:
                self.stats.first_read = now
            if self._fixed_code is not None and not self._pending and self._answer_read(data, now):
                continue
            groups, malformed = assemble_groups(data, self.name)
            if self.cookie_mark_hook is not None:  # only with crash recovery on: no scan otherwise
                highest = max((g.cookie for g in groups), default=0)
                if malformed:
                    highest = max(highest, *(cookie for cookie, _ in malformed))
                if highest > self.cookie_mark:
                    self.cookie_mark = self.cookie_mark_hook(highest)
            self.stats.read_batches.observe(len(groups))
            self._admit(groups, malformed, now)
            admitted += len(groups)

    def _answer_read(self, data: memoryview, now: float) -> bool:
        """Answer a whole read with the policy's fixed code, without a Python object per group: the
        responses are the read's cookie column with the code beside each. Only for reads of
        one-record groups (else False, and the read takes the general path) and only while nothing
        else is pending, so no decision in flight can be for a cookie this read reissues. Cookie 0 or
        a cookie twice in one read (kernel bugs) are left to the kernel, which refuses the write."""
        if data[0::RECORD.size].tobytes().translate(None, _WITH_LAST_PAGE):
            return False
        cookies = data.cast("I")[_COOKIE_WORD::_RECORD_WORDS]
        count = len(cookies)
        responses = bytearray(count * RESPONSE.size)
        columns = memoryview(responses).cast("I")
        columns[0::2] = cookies
        if self._fixed_code:
            columns[1::2] = array("I", (self._fixed_code,)) * count
        if self.cookie_mark_hook is not None:  # only with crash recovery on: no scan otherwise
            highest = max(cookies)
            if highest > self.cookie_mark:
                self.cookie_mark = self.cookie_mark_hook(highest)
        stats = self.stats
        stats.faults += count
        stats.read_batches.observe(count)
        self._queue_run(responses, count, "success" if self._fixed_code == SUCCESS else "invalid", now)
        return True

    def _admit(self, groups: list[FaultGroup], malformed: list[tuple[int, str]], now: float) -> None:
        admitted = []
        room = self.config.max_pending - len(self._pending)
        shed = 0
        for group in groups:
            self.stats.faults += group.fault_count
            stale = self._pending.pop(group.cookie, None)
            if stale is not None:
                self._superseded(stale)
            if room <= 0:
                self._queue_run(RESPONSE.pack(group.cookie, INVALID), 1, "shed", now)
                shed += 1
                continue
            room -= 1
            entry = _Pending(group, now)
            self._pending[group.cookie] = entry
            admitted.append(entry)
            if self._log_groups:
                self._log.debug("group read", cookie=group.cookie, dev_id=group.dev_id, pasid=group.pasid,
                                device=self.config.device_names.get(group.dev_id), faults=group.fault_count,
                                addr=hex(group.addresses[-1]))
        if shed:
            self._log.warning("queue full: groups shed with INVALID", shed=shed, max_pending=self.config.max_pending)
        for cookie, reason in malformed:
            self._log.error("malformed fault group answered INVALID", cookie=cookie, reason=reason)
            if cookie:  # cookie 0 is never issued, so there is nothing to answer
                self._queue_run(RESPONSE.pack(cookie, INVALID), 1, "error", now)
        if admitted:
            self._arm_deadline()
            self._dispatch(admitted)

    # -- decide --------------------------------------------------------------------------------
    def _dispatch(self, entries: list[_Pending]) -> None:
        if getattr(self.policy, "select", None) is None:
            self._start(self.policy, entries)
            return
        routed: dict[int, tuple[Policy, list[_Pending]]] = {}
        for entry in entries:
            try:
                policy = _route(self.policy, entry.group)
            except Exception:
                self._log.exception("policy raised selecting a sub-policy; group answered INVALID",
                                    policy=self.policy.name, cookie=entry.group.cookie)
                self._answer(entry, INVALID, "error")
                continue
            routed.setdefault(id(policy), (policy, []))[1].append(entry)
        for policy, routed_entries in routed.values():
            self._start(policy, routed_entries)

    def _start(self, policy: Policy, entries: list[_Pending]) -> None:
        """One task per batch for policies with ``decide_batch``, else one per group."""
        if getattr(policy, "decide_batch", None) is not None:
            task = self._loop.create_task(self._run_batch(policy, entries))
            for entry in entries:
                entry.task = task
                entry.batched = True
        else:
            for entry in entries:
                entry.task = self._loop.create_task(self._run_one(policy, entry))

    async def _run_one(self, policy: Policy, entry: _Pending) -> None:
        try:
            code = await policy.decide(entry.group)
        except Exception:
            self._log.exception("policy raised; group answered INVALID", policy=policy.name,
                                cookie=entry.group.cookie)
            self._answer(entry, INVALID, "error")
            return
        self._decided(policy, entry, code)

    async def _run_batch(self, policy: Policy, entries: list[_Pending]) -> None:
        try:
            codes = await policy.decide_batch([entry.group for entry in entries])
            if len(codes) != len(entries):
                raise ValueError(f"decide_batch returned {len(codes)} codes for {len(entries)} groups")
        except Exception:
            self._log.exception("policy raised; groups answered INVALID", policy=policy.name,
                                groups=len(entries))
            for entry in entries:
                self._answer(entry, INVALID, "error")
            return
        for entry, code in zip(entries, codes):
            self._decided(policy, entry, code)

    def _decided(self, policy: Policy, entry: _Pending, code: object) -> None:
        if code == SUCCESS and type(code) is not bool:
            self._answer(entry, SUCCESS, "success")
        elif code == INVALID and type(code) is not bool:
            self._answer(entry, INVALID, "invalid")
        else:
            self._log.error("policy returned neither SUCCESS nor INVALID; group answered INVALID",
                            policy=policy.name, cookie=entry.group.cookie, returned=repr(code)[:80])
            self._answer(entry, INVALID, "error")

    def _superseded(self, entry: _Pending) -> None:
        """The kernel answered this group itself (INVALID, on a detach or replace) and reissued its
        cookie: the decision in flight is void. Counted as an error and a response write error."""
        if entry.task is not None and not entry.batched:
            entry.task.cancel()
        self.stats.outcomes["error"] += 1
        self.stats.write_errors += 1
        self._log.warning("group answered by the kernel before its decision (device detached or replaced)",
                          cookie=entry.group.cookie)

    def _arm_deadline(self) -> None:
        if self._deadline_timer is None and self._pending:
            oldest = next(iter(self._pending.values()))  # insertion order is read order
            self._deadline_timer = self._loop.call_at(oldest.read_at + self.config.response_deadline,
                                                      self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        limit = self._loop.time() - self.config.response_deadline + DEADLINE_SLACK
        expired = []
        for entry in self._pending.values():
            if entry.read_at > limit:
                break
            expired.append(entry)
        if expired:
            self._abandon(expired, "policy missed the response deadline")
        self._arm_deadline()

    def _abandon(self, entries: Sequence[_Pending], why: str) -> None:
        """Answer with the deadline code and cancel the policy calls still deciding."""
        for entry in entries:
            self._answer(entry, self.config.deadline_code, "deadline")
            if entry.task is not None:
                entry.task.cancel()  # no-op once done; a batch's task is shared by its entries
        self._log.warning(f"{why}; groups answered with the deadline code", policy=self.policy.name,
                          groups=len(entries), code=self.config.deadline_code)

    # -- answer --------------------------------------------------------------------------------
    def _answer(self, entry: _Pending, code: int, outcome: str) -> None:
        cookie = entry.group.cookie
        if self._pending.get(cookie) is not entry:
            return  # already answered (deadline, shutdown): a late decision changes nothing
        del self._pending[cookie]
        self._queue_run(RESPONSE.pack(cookie, code), 1, outcome, entry.read_at)
        if not self._pending and self._drained is not None:
            self._drained.set()

    def _queue_run(self, responses: bytes | bytearray, count: int, outcome: str, read_at: float) -> None:
        self._outgoing.append((responses, count, outcome, read_at))
        self._outgoing_count += count
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        outgoing, self._outgoing = self._outgoing, []
        self._outgoing_count = 0
        if not outgoing:
            return
        payload = outgoing[0][0] if len(outgoing) == 1 else b"".join(run[0] for run in outgoing)
        try:
            refused = respond_packed(self.source, payload)
        except IommufdError as exc:
            self._log.error("cannot write responses; these groups stay unanswered", error=str(exc),
                            cookies=_cookies(payload))
            self.stats.write_errors += len(payload) // RESPONSE.size
            self._fail(f"cannot write the fault fd: {exc}")
            return
        now = self._loop.time()
        stats = self.stats
        stats.last_write = now
        outcomes = stats.outcomes
        run_read_at, run = 0.0, 0  # answers of one read share read_at: one histogram update per read
        for _, count, outcome, read_at in outgoing:
            outcomes[outcome] += count
            if read_at != run_read_at:
                if run:
                    stats.latency.observe(now - run_read_at, run)
                run_read_at, run = read_at, 0
            run += count
        stats.latency.observe(now - run_read_at, run)
        if stats.latency_samples is not None:
            for _, count, _, read_at in outgoing:
                stats.latency_samples.extend(array("d", (now - read_at,)) * count)
        if self._log_groups:
            cookies = iter(_cookies(payload))
            for _, count, outcome, read_at in outgoing:
                for _ in range(count):
                    self._log.debug("group answered", cookie=next(cookies), outcome=outcome,
                                    latency=round(now - read_at, 6))
        for index in refused:
            stats.write_errors += 1
            self._log.warning("kernel refused a response: the group was already answered "
                              "(its device was detached or replaced)",
                              cookie=RESPONSE.unpack_from(payload, index * RESPONSE.size)[0])

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self._log.error("fault queue no longer served", reason=reason)
        self.stop_reading()

    # -- stop ----------------------------------------------------------------------------------
    async def stop(self, grace: float) -> None:
        """Stop reading, give in-flight policy calls up to ``grace`` seconds, answer what is still
        pending with the deadline code, and write it all back. Nothing read stays unanswered."""
        self.stop_reading()
        if self._pending and grace > 0:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                pass
            self._drained = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        left = list(self._pending.values())
        if left:
            self._abandon(left, "shutting down")
        self._flush()
        tasks = {entry.task for entry in left if entry.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_WAIT)


def _cookies(payload: bytes | bytearray) -> list[int]:
    return memoryview(payload).cast("I")[0::2].tolist()


def _route(policy: Policy, group: FaultGroup) -> Policy:
    """Follow routing policies (those with ``select``, like rules) down to the one that decides."""
    for _ in range(MAX_ROUTING_DEPTH):
        select = getattr(policy, "select", None)
        if select is None:
            return policy
        policy = select(group)
    raise RecursionError(f"more than {MAX_ROUTING_DEPTH} routing policies in a chain")


def _debug_enabled() -> bool:
    try:
        return structlog.get_logger().is_enabled_for(10)  # logging.DEBUG
    except AttributeError:  # a logger type without level filtering logs everything
        return True
