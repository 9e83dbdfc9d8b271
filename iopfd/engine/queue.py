"""One fault queue served end to end: read() -> a batch of groups -> policy -> one write() of answers.

A fault's path, top to bottom of this file:

1. ``_on_readable``: the event loop says the fd is readable. Each read() becomes one batch. The
   groups' clock starts when the queue was last found empty (a read short of the buffer with nothing
   readable after it), or at their readiness if it has been idle since, so time a group waits unread
   in the kernel counts against its deadline. Reading pauses while a whole read
   would not fit under ``max_pending`` (``_pause``), until decisions make room or the groups left in
   the kernel have waited a quarter of their deadline; then it drains the kernel's queue in short turns.
2. A read whose every group gets one code without a decision (a fixed policy's; the deadline code
   when already past its deadline; INVALID when shed) is answered straight from its cookie column
   (``_answer_read``). Otherwise ``_admit`` makes a ``Read`` of numpy columns, answers the malformed
   groups, voids decisions for cookies the kernel reissued, sheds what exceeds ``max_pending`` and
   answers at once what is already past its deadline.
3. ``_dispatch`` hands the batch to the policy by its kind: a fixed code, ``route`` (each target
   gets its sub-batch), ``decide_batch`` (codes now, later, or through ``batch.answer``), or
   ``decide`` per group (``_take_turns``/``_decide_each``: driven once, a task only if it really
   awaits, started in slices of DECIDE_SLICE seconds per loop turn).
4. ``_answer`` closes groups exactly once: a decision, ``_on_deadline`` (no decision in time; written
   at once) or ``stop`` (the daemon exits). ``_flush`` writes every answer of the loop turn in one write() and
   skips exactly the entries the kernel refuses.

Invariant: every group read is open in a ``Read`` of ``_reads`` until answered, then in
``_outgoing`` until written. Reads, not cookies, identify groups: the kernel reuses a cookie as soon
as it is answered, so a late decision for an abandoned group must never answer the new group that
got its cookie (``_void_reissued``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import select
from collections import deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import structlog

from iopfd.engine.batch import Batch, Read, every, np, whole_groups
from iopfd.engine.policy import BatchPolicy, FixedPolicy, Policy, RoutingPolicy
from iopfd.engine.stats import QueueObserver, QueueStats
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.fault import (
    COOKIE_OFFSET,
    DEFAULT_BATCH_RECORDS,
    INVALID,
    LAST_PAGE,
    RECORD,
    RESPONSE,
    SUCCESS,
    FaultGroup,
    FaultQueue,
    respond_packed,
)

log = structlog.get_logger("iopfd.engine")

# Reads per readiness callback before yielding to the loop, so one flooding queue cannot starve the
# others or its own policies (readiness is level-triggered: the loop calls back at once if more is
# queued). One: a read holds up to 8 192 groups, and a wakeup of 4 096 blocked the loop over 100 ms
# in the TCG lab.
MAX_READS_PER_WAKEUP = 1
# max_pending unless configured: groups with the policy at once. A policy that decides whole batches
# (or gives fixed answers) gets two whole reads: one with the policy, one being read (with one read's
# worth, a forward peer idled while its window refilled). Per-group decide() calls cost 15-30 µs a
# group in the TCG lab, and more when they await: what they cannot decide inside the deadline is
# better shed at once, so the device can retry, than answered with the deadline code a second later
# (in a 50 000-group burst, a window of 16 384 took the plug-in's CPU per group from 3.1-3.6 times the C
# floor's to 5.5 times).
MAX_PENDING = 2 * DEFAULT_BATCH_RECORDS
PER_GROUP_MAX_PENDING = 4096
# Back-pressure: a queue reads only while a whole read fits under max_pending (or nothing is open);
# otherwise it stops reading, and groups wait in the kernel until decisions make room, but only
# until the oldest has waited unread for this fraction of its deadline. Then the queue reads until
# the kernel's queue is empty, shedding what exceeds max_pending, in turns of at most
# MAX_WAKEUP_SECONDS so that deadline timers and answers are not held up behind the drain (a read
# answered wholesale took 10-20 ms in the loaded TCG lab: a smaller turn drained one read per turn,
# and the loop's other work between turns made the drain of a 50 000-group storm last seconds).
# (A quarter: after half, the drain of a 50 000-group storm could not end inside the deadline there.)
BEHIND_FRACTION = 0.25
MAX_WAKEUP_SECONDS = 0.02
# Groups read while max_pending are being decided wait, read, for room (``_parked``), up to this many
# times max_pending; only beyond that are they shed. A policy that keeps up then loses nothing to a
# burst that fills the window, and what it cannot reach in time gets the deadline code at its deadline.
# Only for policies that decide whole batches: per-group decide() calls are bounded by their own
# latency, and parked groups queued behind them were answered late in the TCG lab, not decided.
PARKED_FACTOR = 16
# Parked groups get the deadline code ahead of their due time by twice the time that writing every
# parked group's answer takes (the write cost per answer measured on this queue), and at least this
# fraction of their deadline: the policy would have too little time for them, and the deadline answers
# of a whole storm written at once were 40 ms late in the TCG lab. (A fixed fifth of the deadline left
# the tail of a 100 000-group forward burst 250 ms it could have used.)
PARKED_EARLY = 0.05
PARKED_WRITE_MARGIN = 2
# Seconds per answer written, until this queue has measured its own (a TCG guest's write took 2 µs an
# answer, a loaded one more); writes of fewer answers than WRITE_COST_SAMPLE say little about it.
WRITE_COST_START = 5e-6
WRITE_COST_SAMPLE = 256
# Per-group decide() calls that really await, in flight per queue; further groups wait their turn
# inside their deadline. One loop turn resumes every call whose await has finished: 256 of them made
# turns of 444 ms in the TCG lab on a loaded host (about a tenth of that idle), longer than the 50 ms
# a deadline answer may take, since a deadline timer waits for the turn it falls in.
MAX_AWAITING = 64
DECIDE_CHUNK = 64  # groups whose columns _decide_each turns into lists at once
# Per-group calls are started for at most this long per loop turn: a read of 2 048 groups would
# otherwise start them all in one callback, holding deadline timers and answers up behind it. (Each
# slice's answers cost a fixed 2 ms in the TCG lab: 5 ms slices spent nearly a third of a plug-in's
# time on them. A slice stays well inside DEADLINE_EARLY.)
DECIDE_SLICE = 0.01
CLOCK_EVERY = 8  # per-group calls between looks at the clock (loop.time() cost a tenth of a call)
# Deleting every byte with the LAST_PAGE bit from a read's flag bytes leaves nothing exactly when
# every record is a whole one-record group (what a PRI device sends for single-page faults).
_WITH_LAST_PAGE = bytes(b for b in range(256) if b & LAST_PAGE)
_RECORD_WORDS = RECORD.size // 4
_COOKIE_WORD = COOKIE_OFFSET // 4
# Deadline answers are due this fraction of the deadline early (50 ms of the default 1 s): a timer
# waits for the loop turn it falls in, and a deadline answer must not be late by that much. Drain
# turns last up to MAX_WAKEUP_SECONDS; with a peer holding 100 000 groups, a turn of its answers and
# hand-outs held a deadline timer up 48 ms in the seed's forward row of the TCG lab.
DEADLINE_EARLY = 0.05
# After the queue was found empty, a group read later is timed from that moment until the fd has been
# seen idle this long after it; from then on, from its own readiness.
IDLE_CHECK = 0.005
# Routing policies (rules) may select other routing policies; the config forbids cycles.
MAX_ROUTING_DEPTH = 16
# How long stop() waits for cancelled policy tasks to unwind.
CANCEL_WAIT = 1.0
# Cookies are the lowest free value, so they stay below the number of groups pending at once; the
# table that finds the open group of a cookie grows to that. Beyond this, a dict holds them.
MAX_TRACKED_COOKIE = 1 << 22


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str
    response_deadline: float = 1.0
    deadline_code: int = INVALID
    max_pending: int | None = None  # None: MAX_PENDING, or PER_GROUP_MAX_PENDING for decide() per group
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. the VM's name, in every log line
    device_names: Mapping[int, str] = field(default_factory=dict)  # dev_id -> name, in per-group lines


class QueueResponder:
    """Serves one fault queue (any number of HWPTs, devices and PASIDs) with one policy."""

    def __init__(self, source: FaultQueue, policy: Policy, config: QueueConfig) -> None:
        self.source = source
        self.config = config
        self.name = config.name
        self.stats = QueueStats()
        self.failure: str | None = None  # why the queue stopped being served, if it did
        self._reads: dict[int, Read] = {}  # serial -> a read with open groups, in read order
        self._serial = 0
        self._open = 0  # open groups over all reads
        # cookie -> serial of the read that holds it open (0: none), and its group index there
        self._cookie_read: Any = None
        self._cookie_group: Any = None
        self._big_cookies: dict[int, tuple[int, int]] = {}  # the same for cookies beyond the table
        self._awaiting = 0  # per-group decide() tasks in flight
        self._waiting_turn: deque[tuple[Policy, Batch]] = deque()  # per-group work not yet started
        self._parked: deque[Batch] = deque()  # groups read beyond max_pending, in read order
        self._parked_open = 0  # of them, those still open
        self._unpark_handle: asyncio.Handle | None = None
        self._parked_timer: asyncio.TimerHandle | None = None
        self._write_cost = WRITE_COST_START  # seconds per answer written (an average of recent writes)
        # (read, group, code, policy name) of per-group calls that awaited, answered once per loop turn
        self._decided_groups: list[tuple[Read, int, int, str]] = []
        self._decided_handle: asyncio.Handle | None = None
        self._turns_handle: asyncio.Handle | None = None  # _take_turns, when no ending call will run it
        self._warned: dict[str, tuple[int, float]] = {}  # event -> (groups not yet logged, when last logged)
        # Answers not yet written: (responses, started_at, ((outcome, count), ...))
        self._outgoing: list[tuple[Any, float, tuple[tuple[str, int], ...]]] = []
        self._outgoing_count = 0
        self.use_policy(policy)
        self._loop: asyncio.AbstractEventLoop  # the running loop, from start()
        self._reading = False
        self._resume_timer: asyncio.TimerHandle | None = None  # set while reading is paused (back-pressure)
        self._idle_check: asyncio.TimerHandle | None = None  # after the queue was found empty (_found_empty)
        self._unread_since: float | None = None  # the next read's clock start (_found_empty)
        self._readiness = select.poll()  # whether the kernel's queue is empty, without a read
        self._spare: memoryview | None = None  # the next read's buffer (_read_buffer)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._drained: asyncio.Event | None = None
        self._log = log.bind(queue=self.name, **config.labels)
        # Called, before a read's groups are decided, with a bound on its cookies above the mark so
        # far; returns the new mark. The service records it so a restart can sweep what a crash left
        # unanswered.
        self.cookie_mark_hook: Callable[[int], int] | None = None
        self.cookie_mark = 0
        self.observer: QueueObserver | None = None  # sees every read and write (a benchmark's recorder)
        self._log_groups = _debug_enabled()

    def use_policy(self, policy: Policy) -> None:
        """Decide the groups handed out from now on with ``policy`` (a config reload; also at start):
        those already handed to a policy finish with it, parked ones go to this one."""
        self.policy = policy
        self._fixed_code: int | None = policy.code if isinstance(policy, FixedPolicy) else None
        self._parks = _decides_batches(policy)
        if self._fixed_code is None:
            np()  # import numpy now, before READY=1, not on the first fault

    @property
    def max_pending(self) -> int:
        """Groups with the policy at once: as configured, else the default for the policy's kind."""
        if self.config.max_pending is not None:
            return self.config.max_pending
        return MAX_PENDING if self._fixed_code is not None or self._parks else PER_GROUP_MAX_PENDING

    @property
    def reading(self) -> bool:
        return self._reading

    @property
    def deciding(self) -> int:
        """Groups read and not yet answered."""
        return self._open

    @property
    def parked(self) -> int:
        """Groups read and waiting for room under max_pending."""
        return self._parked_open

    @property
    def pending(self) -> int:
        """Groups read and not yet written back."""
        return self._open + self._outgoing_count

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.source.fileno(), self._on_readable)
        self._readiness.register(self.source.fileno(), select.POLLIN)
        self._reading = True
        self._log.info("serving fault queue", fd=self.source.fileno(), policy=self.policy.name,
                       response_deadline=self.config.response_deadline, max_pending=self.max_pending)

    def stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.source.fileno())
            self._reading = False
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None

    # -- read ----------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        loop = self._loop
        woke = loop.time()
        if self._unread_since is None:
            self._unread_since = woke
        reads = 0
        drained, drained_at = False, woke
        while True:
            # Write answers already made first: once a group is auto-answered by a detach, its cookie
            # can come back with a new group in the very next read, and a stale answer must never
            # reach that one. (So answers go out in one write() per read, like the C floor's.)
            self._flush()
            if drained:
                self._found_empty(drained_at)
                return
            now = loop.time()
            if now - self._unread_since < self.config.response_deadline * BEHIND_FRACTION:
                if reads >= MAX_READS_PER_WAKEUP:
                    self._end_turn()
                    return
                if not self._read_fits():
                    self._pause(self._unread_since)
                    return
            elif reads and now - woke >= MAX_WAKEUP_SECONDS:
                self._end_turn()  # behind: the drain goes on next turn, after the timers and answers due
                return
            try:
                # Only the first read of a wakeup can meet an old 6.12 kernel's "0 bytes but POLLIN".
                data = self.source.read_raw(confirm_empty=reads == 0, into=self._read_buffer())
            except IommufdError as exc:
                self._fail(f"cannot read the fault fd: {exc}")
                return
            reads += 1
            if not data:
                self._found_empty(now)
                return
            # A read short of the buffer with nothing readable after it emptied the kernel's queue.
            # (Else, under a steady stream, no read ever found it empty, and every group's clock ran
            # from the stream's first readiness: a p99 of 788 ms for rules at 20k/s in the lab.)
            drained = len(data) < self.source.buffer_records * RECORD.size and not self._readiness.poll(0)
            drained_at = now  # before the read
            if self.cookie_mark_hook is not None:  # crash recovery is on
                self._raise_cookie_mark(len(data) // RECORD.size)
            now = loop.time()
            if self.observer is not None:
                self.observer.read(data, now)
            started = self._unread_since
            # Reads whose every group gets one code without a decision are answered from their
            # cookie column: a fixed policy's, and in a storm, the deadline code or shedding, at a
            # fraction of a decision's cost, so the drain keeps ahead of the groups' deadlines.
            if self._fixed_code is not None:
                if self._answer_read(data, started, now, self._fixed_code,
                                     "success" if self._fixed_code == SUCCESS else "invalid"):
                    continue
            elif now - started >= self._due():
                if self._answer_read(data, started, now, self.config.deadline_code, "deadline"):
                    self._warn_overdue(len(data) // RECORD.size)
                    continue
            elif self._open + len(data) // RECORD.size > self._max_open():
                # What does not fit is shed from its cookie column. The rest is admitted only if a
                # whole read's worth fits: admitting the few groups that decisions free meanwhile
                # made each read of a storm's drain cost twice as much.
                room = self._max_open() - self._open
                room = room * RECORD.size if room >= self._read_size() else 0
                if (not room or data[room - RECORD.size] & LAST_PAGE) and \
                        self._answer_read(data, started, now, INVALID, "shed", room // RECORD.size):
                    self._warn_shed((len(data) - room) // RECORD.size)
                    if room:
                        self._admit(data[:room], started, now)
                    continue
            self._admit(data, started, now)

    def _read_buffer(self) -> memoryview | None:
        """A buffer of this queue's for the next read, when a policy decides whole batches: a read it
        admits is kept (the Read's records) without a copy. (An 80 KiB copy took 0.3 ms in the TCG
        lab, numpy.empty 0.03 ms.) None: the fault queue's own buffer, copied when kept."""
        if self._fixed_code is not None or not self._parks:
            return None
        size = self.source.buffer_records * RECORD.size
        if self._spare is None or len(self._spare) < size:
            self._spare = memoryview(np().empty(size, np().uint8))
        return self._spare

    def _end_turn(self) -> None:
        """A wakeup ends after a read that may have emptied the kernel's queue. Readiness is
        level-triggered, so the loop calls back only if groups are left."""
        if not self._readiness.poll(0):
            self._found_empty(self._loop.time())

    def _found_empty(self, at: float) -> None:
        """The kernel's queue was empty at ``at``. A group read later arrived after that, so its clock
        starts there: the readiness the loop sees comes a busy turn late (the seed's forward groups
        were answered up to 1.17 s after their raise when clocks started at it). Once the fd is still
        idle a moment later (``_check_idle``), the next group's clock starts at its own readiness (a
        group raised 0.8 s after the last was once answered at once, as if it had waited unread)."""
        self._unread_since = at
        if self._idle_check is None:
            self._idle_check = self._loop.call_later(IDLE_CHECK, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_check = None
        if not self._readiness.poll(0):
            self._unread_since = None

    def _read_fits(self) -> bool:
        """A whole read (the buffer's worth of groups) fits under max_pending. With a max_pending
        below the read buffer, half of max_pending must be free: else one slow group open would keep
        every other group waiting in the kernel."""
        return self._open + self._read_size() <= self.max_pending

    def _read_size(self) -> int:
        return min(self.source.buffer_records, self.max_pending // 2)

    def _max_open(self) -> int:
        """Groups read and open at most: max_pending being decided, and those parked."""
        return self.max_pending * (1 + PARKED_FACTOR if self._parks else 1)

    def _room(self) -> int:
        """Groups that may be handed to the policy now."""
        return self.max_pending - (self._open - self._parked_open)

    def _pause(self, unread_since: float) -> None:
        """Stop reading until decisions make room for a whole read (``_close``) or until the groups
        left in the kernel (unread since ``unread_since``) have waited unread for BEHIND_FRACTION of
        their deadline."""
        if self._resume_timer is not None:
            return
        self._loop.remove_reader(self.source.fileno())
        self._resume_timer = self._loop.call_at(
            unread_since + self.config.response_deadline * BEHIND_FRACTION, self._resume)

    def _resume(self) -> None:
        if self._resume_timer is not None:  # called by it, or by _close() before it fires
            self._resume_timer.cancel()
        self._resume_timer = None
        if self._reading:
            self._loop.add_reader(self.source.fileno(), self._on_readable)

    def _answer_read(self, data: memoryview, started: float, now: float, code: int, outcome: str,
                     first: int = 0) -> bool:
        """Answer a whole read (its records from index ``first`` on) with ``code`` from its cookie
        column: no numpy, no object per group. Only for reads of one-record groups (else False: the
        read takes the batch path, which also answers malformed ones) and only if no open group holds
        a cookie of this read (else False: ``_admit`` voids that group, which the kernel answered
        itself on a detach before reissuing its cookie). Cookie 0 or a cookie twice in one read
        (kernel bugs) are left to the kernel, which refuses the write."""
        # Columns are taken by slicing the read's buffer with a step, byte by byte: one tight loop
        # each, where a strided memoryview copies item by item (0.45 ms a read against 0.19 ms in
        # the TCG lab). read_raw's view starts at its buffer's start.
        raw = data.obj if type(data.obj) is bytearray else bytes(data)
        begin, end = first * RECORD.size, len(data)
        if raw[begin:end:RECORD.size].translate(None, _WITH_LAST_PAGE):
            return False
        if self._reads and self._holds_any_cookie(data[begin:]):
            return False
        count = (end - begin) // RECORD.size
        responses = _responses(code, count)
        for byte in range(4):  # the u32 cookie, byte by byte, into each response's first word
            responses[byte::RESPONSE.size] = raw[begin + COOKIE_OFFSET + byte:end:RECORD.size]
        stats = self.stats
        stats.faults += count
        stats.read_batches.observe(count)
        stats.unread_wait.observe(now - started, count)
        self._queue_run(responses, started, ((outcome, count),))
        return True

    def _holds_any_cookie(self, data: memoryview) -> bool:
        """Whether an open group holds a cookie of this read (conservatively True while any absurd
        cookie is tracked outside the table)."""
        if self._big_cookies:
            return True
        cookies = np().frombuffer(data, "<u4")[_COOKIE_WORD::_RECORD_WORDS]
        table = self._cookie_read
        return bool(np().count_nonzero(table[cookies[cookies < len(table)]]))

    def _admit(self, data: memoryview, started: float, now: float) -> None:
        if self._spare is not None and data.obj is self._spare.obj:  # read into the spare: the Read keeps it
            self._spare = None
            kept: bytes | memoryview = data.toreadonly()
        else:
            kept = bytes(data)  # a copy: the fault queue's buffer is reused
        raw, first, last, malformed = whole_groups(kept)
        for cookie, reason in malformed:
            self._log.error("malformed fault group answered INVALID", cookie=cookie, reason=reason)
            if cookie:  # cookie 0 is never issued, so there is nothing to answer
                self._queue_run(RESPONSE.pack(cookie, INVALID), started, (("error", 1),))
        count = len(last)
        if not count:
            return
        self._serial += 1
        read = Read(raw, first, last, self.name, started, self._serial)
        stats = self.stats
        stats.faults += len(read.records)
        stats.read_batches.observe(count)
        stats.unread_wait.observe(now - started, count)
        self._reads[read.serial] = read
        self._open += count
        self._track_cookies(read)
        if self._log_groups:
            self._log_read(read)
        if now - started >= self._due():
            self._answer(read, read.every, self.config.deadline_code, "deadline")
            self._warn_overdue(count)
            return
        self._arm_deadline()
        batch = Batch(read, read.every, self._answer_codes)  # a new read's groups are all open
        room = self._room() + count  # this read's groups are counted open already
        if self._parked or room < count:
            if self._parks:
                self._park(batch)
                return
            self._answer(read, batch.index[max(room, 0):], INVALID, "shed")
            self._warn_shed(count - max(room, 0))
            if room <= 0:
                return
            batch = batch.take(slice(0, room))
        self._dispatch(self.policy, batch, 0)

    def _park(self, batch: Batch) -> None:
        """``batch`` (all of a read's open groups) waits, read, for room under max_pending; it is
        handed out as decisions close groups (``_unpark``), or answered with the deadline code at its
        deadline. A read's parked groups are always its last ones: those from ``read.parked_from``."""
        batch.read.parked_from = int(batch.index[0])
        self._parked_open += len(batch)
        self._parked.append(batch)
        self._hand_out_parked()
        if self._parked_timer is not None:  # more parked: their answers are due earlier
            self._parked_timer.cancel()
            self._parked_timer = None
        self._arm_parked()

    def _arm_parked(self) -> None:
        if self._parked_timer is None and self._parked:
            self._parked_timer = self._loop.call_at(self._parked[0].read.started_at + self._parked_due(),
                                                    self._on_parked_due)

    def _parked_due(self) -> float:
        """Seconds after its clock start at which a parked group gets the deadline code."""
        margin = self._parked_open * self._write_cost * PARKED_WRITE_MARGIN
        return self._due() - max(margin, self.config.response_deadline * PARKED_EARLY)

    def _on_parked_due(self) -> None:
        """Parked groups near their deadline get the deadline code now, and are written at once."""
        self._parked_timer = None
        limit = self._loop.time() - self._parked_due()
        before = self._parked_open
        while self._parked and self._parked[0].read.started_at <= limit:
            batch = self._parked.popleft()
            self._answer(batch.read, batch.index, self.config.deadline_code, "deadline")
        if self._parked_open < before:
            self._warn_at_most_each_second("groups parked behind max_pending did not reach the policy in time; "
                                           "answered with the deadline code", before - self._parked_open,
                                           policy=self.policy.name, code=self.config.deadline_code)
            self._flush()
        self._arm_parked()

    def _unpark(self) -> None:
        self._unpark_handle = None
        self._hand_out_parked()

    def _hand_out_parked(self) -> None:
        """Hand parked groups to the policy, oldest first, as far as max_pending has room: once it has
        room for a read's worth, as reading waits. (Handed out as each answer made room, a forward
        burst went to the peer in batches of a few hundred, each costing as much as a whole read.)"""
        while self._parked:
            batch = self._parked[0]
            room = self._room()
            if room < min(len(batch), self._read_size()):
                return
            still_open = batch.read.open[batch.index]
            if not every(still_open):  # answered meanwhile (their deadline)
                batch = self._parked[0] = batch.take(still_open)
                if not len(batch):
                    self._parked.popleft()
                    continue
            self._parked.popleft()
            if room < len(batch):
                rest = batch.take(slice(room, None))
                self._parked.appendleft(rest)
                batch.read.parked_from = int(rest.index[0])
                batch = batch.take(slice(0, room))
            else:
                batch.read.parked_from = len(batch.read)
            self._parked_open -= len(batch)
            self._dispatch(self.policy, batch, 0)

    def _raise_cookie_mark(self, records: int) -> None:
        """Raise the cookie mark over every cookie of a read of ``records`` records. Cookies are the
        lowest free values (the ABI) and the kernel's pending cookies are those of groups read here
        and not yet written back, so a read's cookies are at most the groups open or waiting to be
        written plus the read's own.
        (Not a scan of the cookies: max() over those of a 2 048-record read took 1.1 ms in the lab.)"""
        bound = self._open + self._outgoing_count + records
        if bound > self.cookie_mark and self.cookie_mark_hook is not None:
            self.cookie_mark = self.cookie_mark_hook(bound)

    def _track_cookies(self, read: Read) -> None:
        """Record which read holds each cookie open, voiding the open group of any cookie the kernel
        has reissued (it answered that group itself, on a detach or replace)."""
        n = np()
        cookies, positions = read.column("cookie"), read.every
        if not (read.rising and cookies[-1] < MAX_TRACKED_COOKIE):  # (rising: none is larger than the last)
            small = cookies < MAX_TRACKED_COOKIE
            if not every(small):  # absurd cookies (a kernel bug): looked up one by one
                for cookie, position in zip(cookies[~small].tolist(), positions[~small].tolist()):
                    holder = self._big_cookies.get(cookie)
                    if holder is not None:
                        self._void_reissued(n.array([holder[0]]), n.array([holder[1]]))
                    self._big_cookies[cookie] = (read.serial, position)
                cookies, positions = cookies[small], positions[small]
                if not len(cookies):
                    return
        highest = int(cookies[-1]) if read.rising else int(cookies.max())
        if self._cookie_read is None or highest >= len(self._cookie_read):
            size = 1 << max(12, highest.bit_length())
            grown_read, grown_group = n.zeros(size, n.int64), n.zeros(size, n.int32)
            if self._cookie_read is not None:
                grown_read[:len(self._cookie_read)] = self._cookie_read
                grown_group[:len(self._cookie_group)] = self._cookie_group
            self._cookie_read, self._cookie_group = grown_read, grown_group
        # Indexes as intp, once: a gather or scatter by a strided u32 column cost three times as much.
        slots = read.cookie_slots = cookies.astype(n.intp)
        holders = self._cookie_read[slots]
        if n.count_nonzero(holders):
            held = holders != 0
            self._void_reissued(holders[held], self._cookie_group[slots[held]])
        self._cookie_read[slots] = read.serial
        self._cookie_group[slots] = positions

    def _void_reissued(self, serials: Any, groups: Any) -> None:
        """The kernel answered these groups (of these reads) itself, INVALID on a detach or replace,
        and reissued their cookies: the decisions in flight are void. Counted as errors and response
        write errors."""
        # Not numpy.unique: its first call imports numpy.ma, half a second in the TCG lab, mid-storm.
        for serial in dict.fromkeys(serials.tolist()):
            read = self._reads.get(serial)
            if read is None:
                continue
            index = groups[serials == serial]
            index = index[read.open[index]]
            if not len(index):
                continue
            self._close(read, index)
            self.stats.outcomes["error"] += len(index)
            self.stats.write_errors += len(index)
            self._log.warning("group answered by the kernel before its decision (device detached or replaced)",
                              cookies=read.column("cookie")[index].tolist())

    # -- decide --------------------------------------------------------------------------------
    def _dispatch(self, policy: Policy, batch: Batch, depth: int) -> None:
        if isinstance(policy, FixedPolicy):
            self._answer(batch.read, batch.index, policy.code)
        elif isinstance(policy, RoutingPolicy):
            self._route(policy, batch, depth)
        elif isinstance(policy, BatchPolicy):
            try:
                result = policy.decide_batch(batch)
            except Exception:
                self._policy_raised(policy, batch)
                return
            if result is None:
                return  # the policy answers through batch.answer
            if inspect.isawaitable(result):
                task = self._loop.create_task(self._await_batch(policy, batch, result))
                batch.read.tasks.add(task)
                task.add_done_callback(batch.read.tasks.discard)
            else:
                self._decided(policy, batch, result)
        else:
            self._waiting_turn.append((policy, batch))  # per-group calls start in turns of their own
            if self._turns_handle is None:
                self._turns_handle = self._loop.call_soon(self._take_turns)

    def _route(self, policy: RoutingPolicy, batch: Batch, depth: int) -> None:
        n = np()
        try:
            if depth >= MAX_ROUTING_DEPTH:
                raise RecursionError(f"more than {MAX_ROUTING_DEPTH} routing policies in a chain")
            route = n.asarray(policy.route(batch))
            if route.shape not in ((), (len(batch),)) or route.dtype.kind not in "iu":
                raise ValueError(f"route() returned {route.dtype} of shape {route.shape} for {len(batch)} groups")
            targets = policy.targets
            if (not 0 <= int(route) < len(targets)) if not route.ndim else \
                    len(route) and (route.min() < 0 or route.max() >= len(targets)):
                raise ValueError(f"route() returned a target index outside 0..{len(targets) - 1}")
        except Exception:
            self._log.exception("policy raised selecting a sub-policy; groups answered INVALID",
                                policy=policy.name, groups=len(batch))
            self._answer(batch.read, batch.index, INVALID, "error")
            return
        if not route.ndim or len(targets) == 1 or every(route == route[0]):
            self._dispatch(targets[int(route.flat[0])], batch, depth + 1)
            return
        fixed = [target.code for target in targets if isinstance(target, FixedPolicy)]
        if len(fixed) == len(targets):  # e.g. rules over accept and reject: each group its target's code
            self._answer(batch.read, batch.index, n.array(fixed, n.uint32)[route])
            return
        order = n.argsort(route, kind="stable")
        bounds = n.searchsorted(route[order], n.arange(len(targets) + 1))
        for target, start, end in zip(targets, bounds[:-1].tolist(), bounds[1:].tolist()):
            if start < end:
                self._dispatch(target, batch.take(order[start:end]), depth + 1)

    async def _await_batch(self, policy: Policy, batch: Batch, result: Any) -> None:
        try:
            codes = await result
        except Exception:
            self._policy_raised(policy, batch)
            return
        self._decided(policy, batch, codes)

    def _decided(self, policy: Policy, batch: Batch, codes: Any) -> None:
        self._answer_codes(batch.read, batch.index, codes, policy.name)

    def _answer_codes(self, read: Read, index: Any, codes: Any, policy: str | None = None) -> None:
        """Answer groups with a policy's codes (one per group, or one for all). Anything but SUCCESS
        or INVALID answers that group INVALID as a policy error. ``Batch.answer`` lands here."""
        n = np()
        index = n.asarray(index)
        try:
            codes = n.asarray(codes)
            if codes.dtype.kind not in "iu" or codes.shape not in ((), index.shape):
                raise ValueError(f"{codes.dtype} of shape {codes.shape}")
        except (ValueError, TypeError) as exc:
            self._log.error("policy returned no code per group; groups answered INVALID",
                            policy=policy or self.policy.name, groups=len(index), returned=str(exc)[:80])
            self._answer(read, index, INVALID, "error")
            return
        good = (codes == SUCCESS) | (codes == INVALID)
        if every(good):
            self._answer(read, index, codes)
            return
        if not codes.ndim:
            codes, good = n.broadcast_to(codes, index.shape), n.broadcast_to(good, index.shape)
        bad = ~good
        self._log.error("policy returned neither SUCCESS nor INVALID; groups answered INVALID",
                        policy=policy or self.policy.name, groups=int(bad.sum()),
                        returned=sorted(set(codes[bad].tolist()))[:8])
        self._answer(read, index[bad], INVALID, "error")
        self._answer(read, index[good], codes[good])

    def _policy_raised(self, policy: Policy, batch: Batch) -> None:
        self._log.exception("policy raised; groups answered INVALID", policy=policy.name, groups=len(batch))
        self._answer(batch.read, batch.index, INVALID, "error")

    def _take_turns(self) -> None:
        """Per-group work waiting for its turn, oldest first: started while fewer than MAX_AWAITING calls
        await, for at most DECIDE_SLICE seconds; then the rest waits for a call to end or the next turn."""
        self._turns_handle = None
        ends = self._loop.time() + DECIDE_SLICE
        while self._waiting_turn and self._awaiting < MAX_AWAITING and self._reading:
            if self._loop.time() >= ends:
                self._turns_handle = self._loop.call_soon(self._take_turns)
                return
            self._decide_each(*self._waiting_turn.popleft(), ends)

    def _decide_each(self, policy: Policy, batch: Batch, ends: float) -> None:
        """Per-group decide(): drive each call once; a call that finishes at once costs no task. What is
        left at MAX_AWAITING or at ``ends`` goes back to the head of the waiting work."""
        loop = self._loop
        read = batch.read
        raw, size, queue = bytes(read.raw), RECORD.size, read.queue  # records of a FaultGroup are bytes
        positions, codes = [], []
        decide = policy.decide
        for chunk in range(0, len(batch), DECIDE_CHUNK):  # columns as lists, a chunk at a time
            index = batch.index[chunk:chunk + DECIDE_CHUNK]
            groups = index.tolist()
            firsts, lasts = (groups, groups) if read.single else (read.first[index].tolist(), read.last[index].tolist())
            for position, (group_index, is_open, first, last, cookie) in enumerate(zip(
                    groups, read.open[index].tolist(), firsts, lasts, read.column("cookie")[index].tolist()), chunk):
                if not is_open:
                    continue
                if self._awaiting >= MAX_AWAITING or (not position % CLOCK_EVERY and loop.time() >= ends):
                    self._waiting_turn.appendleft((policy, batch.take(slice(position, None))))
                    break
                try:
                    call = decide(FaultGroup(cookie, raw[first * size:(last + 1) * size], queue))
                    waiting_on = call.send(None)
                except StopIteration as stop:
                    code = stop.value
                    positions.append(position)
                    codes.append(code if type(code) is int and code in (SUCCESS, INVALID) else -1)
                    continue
                except Exception:
                    self._log.exception("policy raised; group answered INVALID", policy=policy.name, cookie=cookie)
                    self._answer(read, index[position - chunk:position - chunk + 1], INVALID, "error")
                    continue
                self._awaiting += 1
                task = loop.create_task(_finish(call, waiting_on))
                read.tasks.add(task)
                task.add_done_callback(partial(self._group_decided, policy, read, group_index))
            else:
                continue
            break
        if positions:
            self._decided(policy, batch.take(positions), codes)

    def _group_decided(self, policy: Policy, read: Read, group_index: int, task: asyncio.Task) -> None:
        """A per-group call that awaited has ended. Its answer is collected and written with the others
        of this loop turn (``_answer_decided``): one numpy pass per turn, not per group."""
        self._awaiting -= 1
        read.tasks.discard(task)
        if task.cancelled():
            code = None
        elif (exc := task.exception()) is not None:
            self._log.error("policy raised; group answered INVALID", policy=policy.name,
                            cookie=int(read.column("cookie")[group_index]), exc_info=exc)
            code = None
            self._answer(read, np().array([group_index]), INVALID, "error")
        else:
            code = task.result()
            code = code if type(code) is int and code in (SUCCESS, INVALID) else -1
        if code is not None:
            self._decided_groups.append((read, group_index, code, policy.name))
        if self._decided_handle is None:
            self._decided_handle = self._loop.call_soon(self._answer_decided)

    def _answer_decided(self) -> None:
        self._decided_handle = None
        decided, self._decided_groups = self._decided_groups, []
        by_read: dict[tuple[int, str], tuple[Read, list[int], list[int]]] = {}
        for read, group_index, code, policy in decided:
            entry = by_read.get((read.serial, policy))
            if entry is None:
                entry = by_read[read.serial, policy] = (read, [], [])
            entry[1].append(group_index)
            entry[2].append(code)
        n = np()
        for (_, policy), (read, index, codes) in by_read.items():
            self._answer_codes(read, n.array(index), n.array(codes), policy)
        if self._turns_handle is None:
            self._take_turns()

    # -- deadlines -----------------------------------------------------------------------------
    def _arm_deadline(self) -> None:
        if self._deadline_timer is None and self._reads:
            oldest = next(iter(self._reads.values()))  # insertion order is read order
            self._deadline_timer = self._loop.call_at(oldest.started_at + self._due(),
                                                      self._on_deadline)

    def _due(self) -> float:
        """Seconds after its clock's start at which an undecided group gets the deadline code."""
        return self.config.response_deadline * (1 - DEADLINE_EARLY)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        limit = self._loop.time() - self._due()
        expired = []
        for read in self._reads.values():
            if read.started_at > limit:
                break
            expired.append(read)
        if expired:
            self._abandon(expired, "policy missed the response deadline")
            self._flush()  # now, not a loop turn later: the turn may be long (thousands of policy calls)
        self._arm_deadline()

    def _abandon(self, reads: list[Read], why: str) -> None:
        """Answer every open group of these reads with the deadline code, cancelling their policy calls."""
        groups = 0
        for read in reads:
            groups += read.left
            self._answer(read, np().flatnonzero(read.open), self.config.deadline_code, "deadline")
        self._warn_at_most_each_second(f"{why}; groups answered with the deadline code", groups,
                                       policy=self.policy.name, code=self.config.deadline_code)

    def _warn_overdue(self, groups: int) -> None:
        self._warn_at_most_each_second("groups waited unread in the kernel past the response deadline; groups "
                                       "answered with the deadline code", groups, policy=self.policy.name,
                                       code=self.config.deadline_code)

    def _warn_shed(self, groups: int) -> None:
        self._warn_at_most_each_second("queue full: groups shed with INVALID", groups,
                                       max_pending=self.max_pending)

    def _warn_at_most_each_second(self, event: str, groups: int, **fields: Any) -> None:
        """A warning that a storm would repeat for every read: logged at most once a second, with the
        groups since the last line (the metrics count every one)."""
        since = self._warned.get(event)
        now = self._loop.time()
        if since is None or now - since[1] >= 1.0:
            self._log.warning(event, groups=groups + (since[0] if since else 0), **fields)
            self._warned[event] = (0, now)
        else:
            self._warned[event] = (since[0] + groups, since[1])

    # -- answer --------------------------------------------------------------------------------
    def _answer(self, read: Read, index: Any, codes: Any, outcome: str | None = None) -> None:
        """Answer the groups of ``read`` at ``index`` that are still open, each exactly once. ``codes``
        is one code for all or one per index; the outcome is "success"/"invalid" by code unless given."""
        n = np()
        index = n.asarray(index)
        # The whole read, untouched: every group open, and no gather needed (a fifth of a decided
        # read's time in the TCG lab went to gathers like these).
        whole = index is read.every and read.left == len(read)
        if not whole:
            still_open = read.open[index]
            if not every(still_open):
                index = index[still_open]
                if n.ndim(codes):
                    codes = n.asarray(codes)[still_open]
        count = len(index)
        if not count:
            return
        responses = n.empty(count, _response_dtype())
        responses["cookie"] = read.column("cookie") if whole else read.column("cookie")[index]
        responses["code"] = codes
        if outcome is not None:
            outcomes: tuple[tuple[str, int], ...] = ((outcome, count),)
        elif n.ndim(codes):
            succeeded = int(n.count_nonzero(responses["code"] == SUCCESS))
            outcomes = (("success", succeeded), ("invalid", count - succeeded))
        else:
            outcomes = (("success" if codes == SUCCESS else "invalid", count),)
        self._close(read, index, whole)
        self._queue_run(responses.view(n.uint32), read.started_at, outcomes)

    def _close(self, read: Read, index: Any, whole: bool = False) -> None:
        """Close the open groups at ``index``; ``whole``: every group of the read, all still open."""
        if whole:
            read.open.fill(False)
        else:
            read.open[index] = False
        read.left -= len(index)
        self._open -= len(index)
        if read.parked_from < len(read):  # parked groups answered (their deadline, a detach, the stop)
            self._parked_open -= int(np().count_nonzero(index >= read.parked_from))
        # Their cookies are free for the kernel to reissue at once: forgotten now, not when the whole
        # read is answered, or each read of a storm would look like a reissue (the slow path).
        cookies = read.column("cookie") if whole else read.column("cookie")[index]
        absurd = bool(self._big_cookies)
        if absurd:
            for cookie in cookies[cookies >= MAX_TRACKED_COOKIE].tolist():
                if self._big_cookies.get(cookie, (0,))[0] == read.serial:
                    del self._big_cookies[cookie]
        if self._cookie_read is not None:
            if whole and not absurd:  # none voided (all open) and none absurd: every entry is this read's
                self._cookie_read[read.cookie_slots] = 0
            else:
                cookies = cookies[cookies < MAX_TRACKED_COOKIE]
                mine = self._cookie_read[cookies] == read.serial
                self._cookie_read[cookies[mine]] = 0
        if self._parked and self._unpark_handle is None:
            self._unpark_handle = self._loop.call_soon(self._unpark)
        if self._resume_timer is not None and self._read_fits():
            self._resume()
        if read.left:
            return
        del self._reads[read.serial]
        if read.tasks:  # every group is answered: nothing they decide can matter (cancelled after
            self._loop.call_soon(_cancel, list(read.tasks))  # this turn's answers are written)
        if not self._reads and self._drained is not None:
            self._drained.set()

    def _queue_run(self, responses: Any, started_at: float, outcomes: tuple[tuple[str, int], ...]) -> None:
        """Queue packed responses (a new buffer of ``struct iommu_hwpt_page_response``, never changed
        afterwards: an observer may keep it) for the next write."""
        self._outgoing.append((responses, started_at, outcomes))
        self._outgoing_count += len(memoryview(responses).cast("B")) // RESPONSE.size
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
        payload = memoryview(payload).cast("B")
        began = self._loop.time()
        try:
            refused = respond_packed(self.source, payload)
        except IommufdError as exc:
            self._log.error("cannot write responses; these groups stay unanswered", error=str(exc),
                            cookies=_cookies(payload))
            self.stats.write_errors += len(payload) // RESPONSE.size
            self._fail(f"cannot write the fault fd: {exc}")
            return
        now = self._loop.time()
        answers = len(payload) // RESPONSE.size
        if answers >= WRITE_COST_SAMPLE:
            self._write_cost += ((now - began) / answers - self._write_cost) / 4
        if self.observer is not None:
            self.observer.written(outgoing, now)
        stats = self.stats
        counts = stats.outcomes
        run_started, run = 0.0, 0  # answers of one read share started_at: one histogram update per read
        for _, started_at, outcomes in outgoing:
            total = 0
            for outcome, count in outcomes:
                counts[outcome] += count
                total += count
            if started_at != run_started:
                if run:
                    stats.latency.observe(now - run_started, run)
                run_started, run = started_at, 0
            run += total
        if run:
            stats.latency.observe(now - run_started, run)
        if self._log_groups:
            self._log_answers(outgoing, now)
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

    def _log_answers(self, outgoing: list[tuple[Any, float, tuple[tuple[str, int], ...]]], now: float) -> None:
        for responses, started_at, outcomes in outgoing:
            words = memoryview(responses).cast("B").cast("I")
            for cookie, code in zip(words[0::2].tolist(), words[1::2].tolist()):
                # A run has one outcome, or (a policy's codes) success and invalid by code.
                outcome = outcomes[0][0] if len(outcomes) == 1 else "success" if code == SUCCESS else "invalid"
                self._log.debug("group answered", cookie=cookie, code=code, outcome=outcome,
                                latency=round(now - started_at, 6))

    def _log_read(self, read: Read) -> None:
        batch = Batch(read, np().arange(len(read)), self._answer_codes)
        for position in range(len(batch)):
            group = batch.group(position)
            self._log.debug("group read", cookie=group.cookie, dev_id=group.dev_id, pasid=group.pasid,
                            device=self.config.device_names.get(group.dev_id), faults=group.fault_count,
                            addr=hex(group.addresses[-1]))

    # -- stop ----------------------------------------------------------------------------------
    async def stop(self, grace: float) -> None:
        """Stop reading, give in-flight policy calls up to ``grace`` seconds, answer what is still
        open with the deadline code, and write it all back. Nothing read stays unanswered."""
        self.stop_reading()
        self._waiting_turn.clear()  # never called: answered below with the rest
        self._parked.clear()
        for handle in (self._unpark_handle, self._parked_timer):
            if handle is not None:
                handle.cancel()
        self._unpark_handle = self._parked_timer = None
        if self._reads and grace > 0:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
            self._drained = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        left = list(self._reads.values())
        tasks = {task for read in left for task in read.tasks}
        if left:
            self._abandon(left, "shutting down")
        self._flush()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_WAIT)


class _Resumed:
    """The rest of a coroutine that was driven once outside any task and then awaited something."""

    __slots__ = ("call", "waiting_on")

    def __init__(self, call: Any, waiting_on: Any) -> None:
        self.call = call
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        call, waiting_on = self.call, self.waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as exc:  # cancellation, thrown into the awaiting call
                try:
                    waiting_on = call.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting_on = call.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(call: Any, waiting_on: Any) -> Any:
    return await _Resumed(call, waiting_on)


def _responses(code: int, count: int) -> bytearray:
    """``count`` responses of ``code``, their cookies 0: zeroed memory, or one copy of a template."""
    size = count * RESPONSE.size
    if code == SUCCESS:  # 0
        return bytearray(size)
    template = _response_template(code)
    return bytearray(memoryview(template)[:size] if size <= len(template) else RESPONSE.pack(0, code) * count)


@cache
def _response_template(code: int) -> bytes:
    return RESPONSE.pack(0, code) * DEFAULT_BATCH_RECORDS


@cache
def _response_dtype() -> Any:
    return np().dtype([("cookie", "<u4"), ("code", "<u4")])


def _decides_batches(policy: Policy, depth: int = 0) -> bool:
    """Whether every group ``policy`` gets is decided as part of a batch (no per-group decide())."""
    if isinstance(policy, (FixedPolicy, BatchPolicy)):
        return True
    if isinstance(policy, RoutingPolicy) and depth < MAX_ROUTING_DEPTH:
        return all(_decides_batches(target, depth + 1) for target in policy.targets)
    return False


def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()


def _cookies(payload: Any) -> list[int]:
    return memoryview(payload).cast("B").cast("I")[0::2].tolist()


def _debug_enabled() -> bool:
    try:
        return structlog.get_logger().is_enabled_for(10)  # logging.DEBUG
    except AttributeError:  # a logger type without level filtering logs everything
        return True
