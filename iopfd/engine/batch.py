"""A read as columns: the records of one read() over numpy, and the groups in it as index ranges.

``Read`` is everything one read() returned that is still in flight: its records (a structured array
laid out as ``struct iommu_hwpt_pgfault``), each group's first and last record, and which groups are
still open. ``Batch`` is a set of a read's groups handed to one policy: the whole read, or what a
routing policy gave one sub-policy. Columns are numpy arrays with one entry per group, so deciding a
batch makes no Python object per group or per record.

numpy is imported on first use (``np()``): a daemon that serves only fixed answers never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from iopfd.iommufd.fault import KNOWN_FLAGS, LAST_PAGE, PASID_VALID, RECORD, FaultGroup

if TYPE_CHECKING:
    import numpy

# struct iommu_hwpt_pgfault, field by field (tests/kernel/test_layout.py checks it against the headers)
RECORD_FIELDS = (("flags", "<u4"), ("dev_id", "<u4"), ("pasid", "<u4"), ("grpid", "<u4"), ("perm", "<u4"),
                 ("reserved", "<u4"), ("addr", "<u8"), ("length", "<u4"), ("cookie", "<u4"))


@cache
def np() -> Any:
    import numpy

    return numpy


def every(mask: numpy.ndarray) -> bool:
    """``mask.all()`` for a boolean array, counted instead: a third of the time in the TCG lab."""
    return int(np().count_nonzero(mask)) == mask.size


@cache
def record_dtype() -> numpy.dtype:
    dtype = np().dtype(list(RECORD_FIELDS))
    assert dtype.itemsize == RECORD.size
    return dtype


def split_groups(records: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, list[tuple[int, str]]]:
    """Whole groups of a read: each ends at a LAST_PAGE record and all its records share its cookie.

    Returns the first and last record index of each good group, and ``(cookie, reason)`` for each
    cookie of a malformed run (it mixes cookies, has cookie 0, does not end at LAST_PAGE, or shares
    its cookie with another group of the read). Those cookies are still pending in the kernel and
    must be answered; cookie 0 (never issued) cannot be. For the common read (whole one-record
    groups, cookies rising, none 0) first and last are one array, ``arange``: ``Read.rising``.
    """
    n = np()
    flags, cookies = records["flags"], records["cookie"]
    if len(records) > 1 and n.count_nonzero(flags & LAST_PAGE) == len(records) and \
            every(cookies[1:] > cookies[:-1]) and cookies[0]:
        # The common read: whole one-record groups, cookies rising (lowest-free), none 0.
        indexes = n.arange(len(records))
        return indexes, indexes, []
    last = n.flatnonzero(flags & LAST_PAGE)
    first = n.empty_like(last)
    first[:1] = 0
    first[1:] = last[:-1] + 1
    malformed: dict[int, str] = {}
    if len(last) and last[-1] == len(records) - 1 and len(last) == len(records):
        good = cookies != 0  # every group has one record: only cookie 0 can be wrong in itself
        if not every(good):
            for cookie in dict.fromkeys(cookies[~good].tolist()):
                malformed[cookie] = "record with cookie 0 (the kernel never issues cookie 0)"
    else:
        group_cookie = n.repeat(cookies[last], last - first + 1) if len(last) else cookies[:0]
        wrong = (group_cookie != cookies[:len(group_cookie)]) | (cookies[:len(group_cookie)] == 0)
        good = n.ones(len(last), bool)
        if n.count_nonzero(wrong):
            owner = n.repeat(n.arange(len(last)), last - first + 1)
            for index in dict.fromkeys(owner[wrong].tolist()):  # not numpy.unique: see _void_reissued
                run = cookies[first[index]:last[index] + 1].tolist()
                reason = ("record with cookie 0 (the kernel never issues cookie 0)" if 0 in run else
                          f"group with cookie {run[0]} ends without LAST_PAGE before cookie {run[-1]}")
                for cookie in dict.fromkeys(run):
                    malformed.setdefault(cookie, reason)
                good[index] = False
        tail = cookies[len(group_cookie):].tolist()
        if tail:
            reason = (f"group with cookie {tail[0]} has no LAST_PAGE record at the end of the read"
                      if 0 not in tail else "record with cookie 0 (the kernel never issues cookie 0)")
            for cookie in dict.fromkeys(tail):
                malformed.setdefault(cookie, reason)
    good_cookies = cookies[last[good]] if len(last) else cookies[:0]
    # Cookies are allocated lowest-free as the kernel fills the read, so they rise within it: then
    # none repeats, and the sort (a millisecond a read in the TCG lab) is not needed.
    ordered = good_cookies if every(good_cookies[1:] > good_cookies[:-1]) else n.sort(good_cookies)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]  # not numpy.unique: a third of the cost, on every read
    if len(repeated):
        for cookie in dict.fromkeys(repeated.tolist()):
            count = int(n.count_nonzero(ordered == cookie))
            malformed.setdefault(cookie, f"cookie {cookie} used by {count} groups of one read")
    if malformed:
        good &= ~n.isin(cookies[last], n.fromiter(malformed, n.uint32, len(malformed)))
    return first[good], last[good], list(malformed.items())


def whole_groups(raw: bytes | memoryview) -> tuple[bytes | memoryview, numpy.ndarray, numpy.ndarray,
                                                 list[tuple[int, str]]]:
    """split_groups() over the bytes of a read, with the records of malformed runs cut out, so that
    the groups returned tile the bytes returned (what ``Read`` expects)."""
    n = np()
    records = n.frombuffer(raw, record_dtype())
    first, last, malformed = split_groups(records)
    if malformed:
        counts = last - first + 1
        keep = n.repeat(first - n.concatenate(([0], n.cumsum(counts)[:-1])), counts) + n.arange(int(counts.sum()))
        raw = records[keep].tobytes()
        last = n.cumsum(counts) - 1
        first = last - counts + 1
    return raw, first, last, malformed


class Read:
    """The groups of one read() that are in flight, with the moment their clock started. The groups
    tile ``raw``: group i is records ``first[i]`` to ``last[i]``, and ``first[i + 1] == last[i] + 1``."""

    __slots__ = ("raw", "records", "first", "last", "single", "rising", "every", "queue", "started_at", "serial",
                 "open", "left", "parked_from", "tasks", "cookie_slots", "_columns")

    def __init__(self, raw: bytes | memoryview, first: numpy.ndarray, last: numpy.ndarray, queue: str,
                 started_at: float, serial: int = 0) -> None:
        self.raw = raw  # the bytes read (read-only)
        self.records = records = np().frombuffer(raw, record_dtype())
        self.serial = serial  # the queue's number for this read, unique while it is in flight
        self.first = first
        self.last = last
        self.single = bool(len(first) == len(records))  # one record per group: group i is record i
        self.rising = first is last  # one record per group and cookies rising (split_groups' common read)
        # Every group's index. A batch or answer whose index is this very array covers the whole read
        # in order: the engine then needs no gather (``QueueResponder._answer``).
        self.every = last if self.rising else np().arange(len(last))
        self.queue = queue
        self.started_at = started_at
        self.open = np().ones(len(last), bool)
        self.left = len(last)  # groups still open
        self.parked_from = len(last)  # groups from this index on wait for room under max_pending (the engine's)
        self.tasks: set[Any] = set()  # policy calls still deciding groups of this read
        self.cookie_slots: numpy.ndarray | None = None  # its tracked cookies as intp (the engine's)
        self._columns: dict[str, numpy.ndarray] = {}

    def __len__(self) -> int:
        return len(self.last)

    def column(self, name: str) -> numpy.ndarray:
        """One value per group. Fields of the group's last record, except: ``perm`` is every permission
        any record asks for, ``addr_min``/``addr_max`` span every faulting address."""
        found = self._columns.get(name)
        if found is None:
            found = self._columns[name] = self._compute(name)
        return found

    def _compute(self, name: str) -> numpy.ndarray:
        records, n = self.records, np()
        if name in ("perm", "addr_min", "addr_max"):
            field = "perm" if name == "perm" else "addr"
            if self.single:
                return records[field]
            reduce = {"perm": n.bitwise_or, "addr_min": n.minimum, "addr_max": n.maximum}[name]
            if not len(self.first):
                return records[field][:0]
            return reduce.reduceat(records[field], self.first)[: len(self.first)]
        if name == "flags":
            return records["flags"][self.last] & KNOWN_FLAGS
        return records[name] if self.single else records[name][self.last]

    def every_record(self, record_mask: numpy.ndarray) -> numpy.ndarray:
        """Per group: whether ``record_mask`` holds for every one of its records."""
        if self.single:
            return record_mask
        return np().logical_and.reduceat(record_mask, self.first) if len(self.first) else record_mask[:0]


class Batch:
    """Groups of one read handed to one policy. ``index`` picks them out of the read, in read order.

    Columns (``cookie``, ``dev_id``, ``pasid``, ``pasid_valid``, ``grpid``, ``perm``, ``addr_min``,
    ``addr_max``) are numpy arrays with one entry per group of the batch. A policy that answers later
    (it returned None from ``decide_batch``) answers through ``answer``.
    """

    __slots__ = ("read", "index", "_answer", "_whole")

    def __init__(self, read: Read, index: numpy.ndarray, answer: Callable[[Read, numpy.ndarray, Any], None]) -> None:
        self.read = read
        self.index = index  # sorted, no repeats
        self._answer = answer
        self._whole = len(index) == len(read)  # every group of the read: columns need no indexing

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Batch(queue={self.queue!r}, groups={len(self)})"

    @property
    def queue(self) -> str:
        return self.read.queue

    def column(self, name: str) -> numpy.ndarray:
        column = self.read.column(name)
        return column if self._whole else column[self.index]

    @property
    def cookie(self) -> numpy.ndarray:
        return self.column("cookie")

    @property
    def dev_id(self) -> numpy.ndarray:
        return self.column("dev_id")

    @property
    def pasid(self) -> numpy.ndarray:
        """Meaningful where ``pasid_valid``."""
        return self.column("pasid")

    @property
    def pasid_valid(self) -> numpy.ndarray:
        return (self.column("flags") & PASID_VALID) != 0

    @property
    def grpid(self) -> numpy.ndarray:
        return self.column("grpid")

    @property
    def perm(self) -> numpy.ndarray:
        return self.column("perm")

    @property
    def addr_min(self) -> numpy.ndarray:
        return self.column("addr_min")

    @property
    def addr_max(self) -> numpy.ndarray:
        return self.column("addr_max")

    @property
    def fault_count(self) -> numpy.ndarray:
        read = self.read
        return (read.last - read.first + 1)[self.index]

    def every_record(self, record_mask: numpy.ndarray) -> numpy.ndarray:
        """Per group of the batch: whether ``record_mask`` (one entry per record of the whole read,
        e.g. ``batch.read.records["addr"] < limit``) holds for every one of its records."""
        groups = self.read.every_record(record_mask)
        return groups if self._whole else groups[self.index]

    def take(self, positions: numpy.ndarray | slice | list[int]) -> Batch:
        """The groups at ``positions`` of this batch (indexes, a slice or a boolean mask), as a batch."""
        return Batch(self.read, self.index[positions], self._answer)

    def records(self) -> numpy.ndarray:
        """A copy of the batch's records, whole groups in order, as the fault fd returned them."""
        read = self.read
        if self._whole:  # the groups tile the read: a memcpy, not a gather
            return np().frombuffer(bytearray(read.raw), record_dtype())
        if read.single:
            return read.records[self.index]
        n = np()
        first, last = read.first[self.index], read.last[self.index]
        counts = last - first + 1
        starts = n.repeat(first - n.concatenate(([0], n.cumsum(counts)[:-1])), counts)
        return read.records[starts + n.arange(int(counts.sum()))]

    def group(self, position: int) -> FaultGroup:
        """The group at ``position`` as a FaultGroup (for per-group policies)."""
        read, i = self.read, int(self.index[position])
        first, last = int(read.first[i]), int(read.last[i])
        records = bytes(read.raw[first * RECORD.size:(last + 1) * RECORD.size])
        return FaultGroup(int(read.records["cookie"][last]), records, read.queue)

    def answer(self, positions: numpy.ndarray | slice, codes: Any) -> None:
        """Answer the groups at ``positions`` (of this batch) with ``codes`` (one per group, or one for
        all): SUCCESS or INVALID. Groups already answered (at their deadline) are skipped.
        ``slice(None)``: the whole batch."""
        whole = isinstance(positions, slice) and positions == slice(None)
        self._answer(self.read, self.index if whole else self.index[positions], codes)


def batch_of(groups: Sequence[FaultGroup], answer: Callable[[Read, numpy.ndarray, Any], None] | None = None) -> Batch:
    """A batch of FaultGroups, as if one read had returned them (for deciding groups outside the
    engine, and for tests). ``answer`` receives what a policy answers through ``batch.answer``."""
    n = np()
    counts = n.array([group.fault_count for group in groups], n.intp)
    last = n.cumsum(counts) - 1
    read = Read(b"".join(group.records for group in groups), last - counts + 1, last,
                groups[0].queue if groups else "", 0.0)
    return Batch(read, n.arange(len(groups)), answer or (lambda read, index, codes: None))
