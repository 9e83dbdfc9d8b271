"""The peer channels of a ``forward`` policy: SOCK_SEQPACKET sockets to the VMM (docs/protocol.md).

``FaultChannel`` carries fault groups out and answers back. Each packet iopfd sends holds whole
groups, as ``struct iommu_hwpt_pgfault`` records exactly as the fault fd's read() returned them,
except ``cookie``: iopfd's id for the group on this channel. A packet holds at most ``read_records``
records (what the peer reads at once). The peer sends packets of ``struct iommu_hwpt_page_response``
{id, code}, any number per packet.

Ids are handed out as one contiguous range per batch, increasing, so an answer is mapped back to
its group with one searchsorted over the ranges still open: no Python object per group. Internally
an id is a 64-bit sequence number; the wire carries its low 32 bits. A range never straddles a
multiple of 2^32 and id 0 is never used, so every open id is unique as long as fewer than 2^32 ids
lie between the oldest open group and the newest (the engine's deadline closes groups long before).

iopfd never blocks on the peer: sends are non-blocking, and while the socket is full the groups
wait in ``_queue`` (``queued`` of them) inside their deadline; the event loop says when there is
room again. Deadlines, shedding and the answer of a group the peer never answers stay with the
engine: a group it closed is skipped when sending, and an answer for it counts as late.

``EventChannel`` carries vEVENTs out, one per packet: the 8-byte ``struct iommufd_vevent_header``
{flags, sequence} and the payload, as a read() of the vEVENTQ returns them (LOST_EVENTS headers
included). It takes no answers.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from itertools import pairwise
from typing import TYPE_CHECKING

import structlog

from iopfd import protocol
from iopfd.engine.batch import every, np
from iopfd.iommufd.fault import INVALID, SUCCESS
from iopfd.iommufd.viommu import HEADER, LOST_EVENTS

if TYPE_CHECKING:
    import numpy

    from iopfd.engine.batch import Batch
    from iopfd.engine.events import Vevent
    from iopfd.policies.forward import ForwardPolicy

log = structlog.get_logger("iopfd.channel")

ID_SPACE = 1 << 32
ID_MASK = ID_SPACE - 1
MAX_PACKETS_PER_WAKEUP = 64  # answer packets read per readiness callback before yielding to the loop
PACKET_ROOM = protocol.MAX_RESPONSES * protocol.RESPONSE_SIZE  # the largest answer packet
# Answer packets received back to back are taken in one pass (numpy's cost is per call, not per
# answer): up to this many of the largest, usually all that arrived.
PACKETS_AT_ONCE = 4
# vEVENTs held while the event channel is full; beyond that they are dropped, and a LOST_EVENTS
# header (as the kernel would write) goes before the next event sent.
MAX_EVENT_BACKLOG = 1024


def check_channel_socket(fd: int) -> socket.socket:
    """``fd`` as a socket object, if it is a connected AF_UNIX SOCK_SEQPACKET socket; else ValueError
    saying what it is. The socket object owns ``fd`` only when this returns."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not a socket ({exc.strerror}): pass one end of "
                         "socketpair(AF_UNIX, SOCK_SEQPACKET)") from None
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if sock.family != socket.AF_UNIX or kind != socket.SOCK_SEQPACKET:
            raise ValueError(f"fd {fd} is a {socket.AddressFamily(sock.family).name} "
                             f"{socket.SocketKind(kind).name} socket, not AF_UNIX SOCK_SEQPACKET: pass one end of "
                             "socketpair(AF_UNIX, SOCK_SEQPACKET)")
        try:
            sock.getpeername()
        except OSError:
            raise ValueError(f"fd {fd} is a SOCK_SEQPACKET socket with no peer: pass one end of "
                             "socketpair(AF_UNIX, SOCK_SEQPACKET)") from None
    except BaseException:
        sock.detach()  # the caller keeps its fd
        raise
    return sock


def _response_dtype() -> numpy.dtype:
    return np().dtype([("cookie", "<u4"), ("code", "<u4")])


class _Range:
    """The groups of one batch on the channel: ids ``start`` .. ``start + len - 1``."""

    __slots__ = ("start", "batch", "ends", "single", "data", "sent", "answered", "left")

    def __init__(self, start: int, batch: Batch, ends: numpy.ndarray, data: memoryview) -> None:
        self.start = start
        self.batch = batch
        self.ends = ends  # per group: the index just past its last record, within this range's records
        self.single = batch.read.single  # one record a group: group i ends at record i + 1
        self.data = data  # the records as bytes (uint8), ids in place of cookies
        self.sent = 0  # groups sent (a prefix)
        self.answered = np().zeros(len(batch), bool)  # by the peer
        self.left = len(batch)  # groups the peer has not answered

    def closed(self) -> bool:
        """Nothing left to answer: the peer or the engine (deadline, shutdown) answered every group."""
        if not self.left:
            return True
        batch = self.batch
        if batch.index is batch.read.every:  # the whole read: its count of open groups says
            return not batch.read.left
        return not np().count_nonzero(batch.read.open[batch.index])


class _Channel:
    """What both channels do with their socket: non-blocking sends that wait for room, and letting go."""

    def __init__(self, sock: socket.socket, policy: ForwardPolicy, name: str) -> None:
        self.sock = sock
        self.policy = policy
        self.stats = policy.stats
        self.name = name
        self.closed = False
        self._waiting_room = False  # a writer callback is registered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = log.bind(policy=policy.name, peer=name)
        sock.setblocking(False)

    def _send(self) -> None:
        raise NotImplementedError

    def _wait_for_room(self) -> None:
        assert self._loop is not None  # only a started channel sends
        self._waiting_room = True
        self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        assert self._loop is not None  # called by the loop that _wait_for_room() registered it with
        self._loop.remove_writer(self.sock.fileno())
        self._waiting_room = False
        self._send()

    def close(self) -> None:
        """iopfd lets go of the peer (it is stopping)."""
        self._disconnect("iopfd closed the channel")

    def _disconnect(self, reason: str) -> None:
        raise NotImplementedError

    def _let_go(self) -> bool:
        """Stop watching the socket and leave the policy; False if that was done already."""
        if self.closed:
            return False
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            if self._waiting_room:
                self._loop.remove_writer(self.sock.fileno())
        self.policy.disconnect(self)
        return True


class FaultChannel(_Channel):
    """The fault side of one peer of a ``forward`` policy. ``start()`` in the running loop."""

    def __init__(self, sock: socket.socket, policy: ForwardPolicy, *,
                 read_records: int = protocol.DEFAULT_READ_RECORDS, name: str = "peer",
                 events: EventChannel | None = None) -> None:
        if not 1 <= read_records <= protocol.MAX_READ_RECORDS:
            raise ValueError(f"read_records: 1 to {protocol.MAX_READ_RECORDS} records, got {read_records}")
        super().__init__(sock, policy, name)
        self.read_records = read_records
        self.events = events  # the same peer's event channel: it ends with this one
        self.queued = 0  # groups waiting to be sent (the socket was full)
        self.on_close: Callable[[FaultChannel], None] | None = None  # called once the channel is closed
        self._ranges: list[_Range] = []  # in id order: every range with a group still open
        self._starts: numpy.ndarray | None = None  # their starts, cached for searchsorted
        self._queue: deque[_Range] = deque()  # ranges with groups not yet sent, in id order
        self._next = 1  # the next id's sequence number
        self._buffer = bytearray(PACKETS_AT_ONCE * PACKET_ROOM)
        packet = read_records * protocol.RECORD_SIZE
        # A packet larger than the send buffer fails with EMSGSIZE (the kernel doubles what is set).
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 4 * packet:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * packet)

    def start(self) -> None:
        """Connect to the policy (RuntimeError if it has a peer) and start reading answers."""
        self.policy.connect(self, self.events)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        if self.events is not None:
            self.events.start()
        self._log.info("forward peer channel open", read_records=self.read_records, events=self.events is not None)

    # -- out -----------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> None:
        """Send ``batch``'s groups to the peer (now, or once the socket has room); their answers come
        back through ``batch.answer``. Groups larger than a packet are answered INVALID here."""
        n = np()
        if batch.read.single:  # one record a group: every group fits a packet
            self._queue_range(batch, None)
            return
        sizes = batch.fault_count
        too_large = sizes > self.read_records
        if n.count_nonzero(too_large):
            self.stats.oversized += int(too_large.sum())
            self._log.error("fault group larger than the peer reads at once; answered INVALID",
                            groups=int(too_large.sum()),
                            records=int(sizes[too_large].max()), read_records=self.read_records)
            batch.answer(n.flatnonzero(too_large), INVALID)
            batch = batch.take(~too_large)
            sizes = sizes[~too_large]
        if len(batch):
            self._queue_range(batch, sizes)

    def _queue_range(self, batch: Batch, sizes: numpy.ndarray | None) -> None:
        """Give ``batch`` (groups of ``sizes`` records; None: one each) ids and queue it to be sent."""
        n = np()
        count = len(batch)
        start = self._allocate(count)
        records = batch.records()
        ids = n.arange(start & ID_MASK, (start & ID_MASK) + count, dtype=n.uint32)  # _allocate: no wrap
        records["cookie"] = ids if sizes is None else n.repeat(ids, sizes)
        ends = n.arange(1, count + 1) if sizes is None else n.cumsum(sizes)
        found = _Range(start, batch, ends, memoryview(records.view(n.uint8)))
        self._sweep()
        self._ranges.append(found)
        self._starts = None
        self._queue.append(found)
        self.queued += count
        self._send()

    def _allocate(self, count: int) -> int:
        start = self._next
        if (start & ID_MASK) + count > ID_SPACE:  # the range would wrap: start it at the next id 1
            start = (start | ID_MASK) + 2
        self._next = start + count
        return start

    def _send(self) -> None:
        """Send what is queued, packet by packet, until done or the socket is full."""
        if self._waiting_room or self.closed:
            return
        n, queue, limit = np(), self._queue, self.read_records
        while queue:
            first = queue[0]
            if not first.sent and first.closed():  # answered while it waited (its deadline): never sent
                queue.popleft()
                self.queued -= len(first.ends)
                first.sent = len(first.ends)
                continue
            if first.single and len(first.ends) - first.sent >= limit:
                if not self._send_full_packets(first):
                    return
                continue
            parts: list[memoryview] = []
            plan: list[tuple[_Range, int]] = []
            room = limit
            for found in queue:
                if plan and not found.sent and found.closed():
                    break  # dropped once it is first
                if found.single:  # group i is record i: no lookups
                    base = found.sent
                    stop = end = min(base + room, len(found.ends))
                else:
                    base = int(found.ends[found.sent - 1]) if found.sent else 0
                    stop = int(n.searchsorted(found.ends, base + room, "right"))  # the groups that fit
                    end = int(found.ends[stop - 1]) if stop else 0
                if stop <= found.sent:
                    break
                parts.append(found.data[base * protocol.RECORD_SIZE:end * protocol.RECORD_SIZE])
                plan.append((found, stop))
                room -= end - base
                if stop < len(found.ends) or not room:
                    break
            try:
                self.sock.sendmsg(parts)
            except BlockingIOError:
                self._wait_for_room()
                return
            except OSError as exc:  # the peer is gone; answers it sent before still count
                self._gone(f"send failed: {exc.strerror or exc}")
                return
            for found, stop in plan:
                self._mark_sent(found, stop)

    def _send_full_packets(self, found: _Range) -> bool:
        """Send ``found``'s one-record groups in full packets, back to back, with the bookkeeping once
        (it cost as much as the send per packet in the TCG lab); False if the socket is full or the
        peer is gone."""
        size, count, total = self.read_records * protocol.RECORD_SIZE, self.read_records, len(found.ends)
        data, sent = found.data, found.sent
        try:
            while total - sent >= count:
                self.sock.send(data[sent * protocol.RECORD_SIZE:sent * protocol.RECORD_SIZE + size])
                sent += count
        except BlockingIOError:
            self._mark_sent(found, sent)
            self._wait_for_room()
            return False
        except OSError as exc:  # the peer is gone; answers it sent before still count
            self._mark_sent(found, sent)
            self._gone(f"send failed: {exc.strerror or exc}")
            return False
        self._mark_sent(found, sent)
        return True

    def _mark_sent(self, found: _Range, stop: int) -> None:
        """``found``'s groups up to ``stop`` went to the peer; a range sent whole leaves the queue
        (ranges go out in queue order, so it is the first)."""
        sent = stop - found.sent
        self.queued -= sent
        self.stats.sent += sent
        found.sent = stop
        if stop == len(found.ends):
            self._queue.popleft()

    # -- in ------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        self._receive(MAX_PACKETS_PER_WAKEUP)

    def _receive(self, packets: int) -> bool:
        """Take up to ``packets`` answer packets, those received back to back in one pass; True if
        there may be more."""
        if self.closed:
            return False
        view, filled, more, gone = memoryview(self._buffer), 0, True, None
        for _ in range(packets):
            if len(view) - filled < PACKET_ROOM:
                self._take_answers(filled)
                filled = 0
            try:
                size = self.sock.recv_into(view[filled:], PACKET_ROOM, socket.MSG_TRUNC)
            except BlockingIOError:
                more = False
                break
            except ConnectionResetError:
                # The peer closed with packets of ours unread. Linux reports that once, then still
                # delivers what the peer sent before: its last answers count.
                continue
            except OSError as exc:
                gone = f"receive failed: {exc.strerror or exc}"
                break
            if not size:  # end of the connection (an empty packet cannot be told from it)
                gone = "peer closed the channel"
                break
            filled += self._whole_answers(size)
        self._take_answers(filled)  # a peer's last answers count
        if gone is not None:
            self._disconnect(gone)
            return False
        return more

    def _whole_answers(self, size: int) -> int:
        """The bytes of a received packet that are whole page responses."""
        whole = min(size, PACKET_ROOM) // protocol.RESPONSE_SIZE * protocol.RESPONSE_SIZE
        if whole != size:
            self.stats.malformed_packets += 1
            self._log.error("answer packet is not a whole number of 8-byte page responses within "
                            f"{protocol.MAX_RESPONSES}; the rest is ignored", bytes=size)
        return whole

    def _take_answers(self, size: int) -> None:
        if size:
            self._answers(np().frombuffer(self._buffer, _response_dtype(), size // protocol.RESPONSE_SIZE))

    def _answers(self, responses: numpy.ndarray) -> None:
        n = np()
        self._sweep()
        ranges = self._ranges
        late = len(responses)  # until shown to answer an open group
        whole = self._whole_ranges(responses)
        if whole:
            late -= whole
            responses = responses[whole:]
        if ranges and len(responses):
            # Every id ever sent is one of the 2^32 sequence numbers just below _next.
            following = self._next
            seq = ((following - 1) & ~ID_MASK) + responses["cookie"].astype(n.int64)
            seq[seq >= following] -= ID_SPACE
            if self._starts is None:
                self._starts = n.fromiter((r.start for r in ranges), n.int64, len(ranges))
            which = n.searchsorted(self._starts, seq, "right") - 1  # -1: older than every open range
            offset = seq - self._starts[which]
            codes = responses["code"]
            # Runs of answers to one range (in order, one run per batch answered); not numpy.unique,
            # whose first call imports numpy.ma (half a second in the TCG lab).
            bounds = [0, *(n.flatnonzero(which[1:] != which[:-1]) + 1).tolist(), len(which)]
            for start, end in pairwise(bounds):
                if which[start] >= 0:
                    late -= self._answer_range(ranges[which[start]], offset[start:end], codes[start:end])
        if late:
            self.stats.late_answers += late
        self._sweep()

    def _whole_ranges(self, responses: numpy.ndarray) -> int:
        """Answer the open ranges that ``responses`` begin with, if each is answered whole, in order, once
        per id (the answer a peer gives to what it was sent); returns how many responses that took."""
        cookies, done = responses["cookie"], 0
        if len(cookies) > 1 and not every(cookies[1:] > cookies[:-1]):
            return 0
        for found in self._ranges:
            if done == len(cookies):
                break
            if not found.left:
                continue
            count, first = len(found.ends), found.start & ID_MASK
            if not (found.sent == found.left == count and done + count <= len(cookies)
                    and int(cookies[done]) == first and int(cookies[done + count - 1]) == first + count - 1
                    and found.batch.read.left == len(found.batch.read)):
                break  # (rising, and the first and last ids right: every id of the range once, in order)
            self._answer_range(found, None, responses["code"][done:done + count])
            done += count
        return done

    def _answer_range(self, found: _Range, offsets: numpy.ndarray | None, codes: numpy.ndarray) -> int:
        """Answer the groups of ``found`` at ``offsets`` that are open; returns how many were. None: every
        group of the range, in order, all open (``_whole_ranges`` has checked)."""
        n = np()
        batch, count = found.batch, len(found.ends)
        positions: numpy.ndarray | slice
        if offsets is None or (
                len(offsets) == count == found.sent == found.left and offsets[0] == 0 and offsets[-1] == count - 1
                and every(offsets[1:] > offsets[:-1]) and batch.read.left == len(batch.read)):
            # The common answer: every group of a whole read, once each, in order (rising from 0 to the
            # last: exactly each offset), none answered yet: no gathers.
            positions, taken = slice(None), count
        else:
            if len(offsets) > 1 and not every(offsets[1:] > offsets[:-1]):  # not in order: maybe an id twice
                order = n.argsort(offsets, kind="stable")  # not numpy.unique (see _answers)
                ordered = offsets[order]
                first = n.concatenate(([True], ordered[1:] != ordered[:-1]))  # the first answer of an id counts
                offsets, codes = ordered[first], codes[order[first]]
            sent = offsets < found.sent  # beyond: an id in a gap, or of a group not sent yet
            if not every(sent):
                offsets, codes = offsets[sent], codes[sent]
            fresh = ~found.answered[offsets] & batch.read.open[batch.index[offsets]]
            if not every(fresh):
                offsets, codes = offsets[fresh], codes[fresh]
            positions, taken = offsets, len(offsets)
            if not taken:
                return 0
        found.answered[positions] = True
        found.left -= taken
        self.stats.answered += taken
        # A code other than SUCCESS or INVALID: the engine answers that group INVALID as an error, and logs it
        self.stats.bad_codes += int(n.count_nonzero((codes != SUCCESS) & (codes != INVALID)))
        batch.answer(positions, codes)
        return taken

    def _sweep(self) -> None:
        """Forget the oldest ranges once every group in them is answered."""
        ranges = self._ranges
        done = 0
        while done < len(ranges) and ranges[done].sent == len(ranges[done].ends) and ranges[done].closed():
            done += 1
        if done:
            del ranges[:done]
            self._starts = None

    # -- end -----------------------------------------------------------------------------------
    def _gone(self, reason: str) -> None:
        """A send failed: read all the peer sent before it went, then let go of it."""
        while self._receive(MAX_PACKETS_PER_WAKEUP):
            pass
        self._disconnect(reason)

    def _disconnect(self, reason: str) -> None:
        """Every group still open on the channel gets the policy's when_disconnected answer at once."""
        if not self._let_go():
            return
        code = self.policy.disconnected_code
        groups = 0
        for found in self._ranges:
            positions = np().flatnonzero(~found.answered & found.batch.read.open[found.batch.index])
            if len(positions):
                groups += len(positions)
                found.batch.answer(positions, code)
        self._ranges.clear()
        self._queue.clear()
        self._starts = None
        self.queued = 0
        self.sock.close()
        self.stats.disconnects += 1
        self._log.info("forward peer channel closed", reason=reason, open_groups_answered=groups,
                       when_disconnected="success" if code == SUCCESS else "invalid")
        if self.events is not None:
            self.events.close()
        if self.on_close is not None:
            self.on_close(self)


class EventChannel(_Channel):
    """The vEVENT side of one peer of a ``forward`` policy: one event per packet, nothing back."""

    def __init__(self, sock: socket.socket, policy: ForwardPolicy, *, name: str = "peer") -> None:
        super().__init__(sock, policy, name)
        self._backlog: deque[bytes] = deque()
        self._dropped_upto: int | None = None  # the sequence of the last event dropped, not yet announced

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)  # for the end of the connection

    @property
    def queued(self) -> int:
        return len(self._backlog)

    def send(self, event: Vevent) -> None:
        if self.closed:
            return
        if len(self._backlog) >= MAX_EVENT_BACKLOG:
            self._dropped_upto = event.sequence
            self.stats.events_dropped += 1
            return
        if self._dropped_upto is not None:
            self._backlog.append(HEADER.pack(LOST_EVENTS, self._dropped_upto))
            self._log.warning("vEVENTs dropped: the peer's event channel was full", upto=self._dropped_upto)
            self._dropped_upto = None
        flags = LOST_EVENTS if event.data is None else 0
        self._backlog.append(HEADER.pack(flags, event.sequence) + (event.data or b""))
        self._send()

    def _send(self) -> None:
        if self._waiting_room:
            return
        while self._backlog:
            try:
                self.sock.send(self._backlog[0])
            except BlockingIOError:
                self._wait_for_room()
                return
            except OSError as exc:
                self._disconnect(f"send failed: {exc.strerror or exc}")
                return
            self._backlog.popleft()
            self.stats.events_sent += 1

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(1)  # the peer sends nothing on this channel: only its end matters
        except BlockingIOError:
            return
        except OSError as exc:
            self._disconnect(f"receive failed: {exc.strerror or exc}")
            return
        if not data:
            self._disconnect("peer closed the event channel")
        else:
            self._log.warning("the peer sent data on the event channel, which takes none; ignored")

    def _disconnect(self, reason: str) -> None:
        if not self._let_go():
            return
        self._backlog.clear()
        self.sock.close()
        self._log.info("forward peer event channel closed", reason=reason)
