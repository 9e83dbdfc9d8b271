"""The forward policy's peer channel on the host: a socketpair, real Batches, the test as the peer."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import numpy
import pytest
import pytest_asyncio

from iopfd import protocol
from iopfd.engine import QueueConfig, QueueResponder
from iopfd.engine.batch import Batch, Read, record_dtype, split_groups
from iopfd.engine.events import Vevent
from iopfd.iommufd.fault import INVALID, LAST_PAGE, SUCCESS
from iopfd.policies import ForwardPolicy
from iopfd.policies.forward import ForwardOptions
from iopfd.service import peer_channel
from iopfd.service.peer_channel import EventChannel, FaultChannel, check_channel_socket
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

pytestmark = pytest.mark.asyncio
RESPONSE = numpy.dtype([("cookie", "<u4"), ("code", "<u4")])


class Engine:
    """What the engine does with ``batch.answer``: answer each open group once, then close it."""

    def __init__(self) -> None:
        self.answers: dict[int, int] = {}  # kernel cookie -> code

    def answer(self, read: Read, index, codes) -> None:
        index = numpy.asarray(index)
        codes = numpy.broadcast_to(numpy.asarray(codes), index.shape)
        still_open = read.open[index]
        for cookie, code in zip(read.column("cookie")[index[still_open]].tolist(), codes[still_open].tolist()):
            assert cookie not in self.answers
            self.answers[cookie] = code
        read.open[index[still_open]] = False
        read.left -= int(still_open.sum())

    def deadline(self, read: Read, code: int = INVALID) -> None:
        self.answer(read, numpy.flatnonzero(read.open), code)

    def batch(self, sizes: list[int], first_cookie: int = 1, addr: int = 0x1000) -> Batch:
        """One read of groups with ``sizes`` records each, cookies from ``first_cookie``."""
        records = numpy.zeros(sum(sizes), record_dtype())
        at = 0
        for i, size in enumerate(sizes):
            group = records[at:at + size]
            group["cookie"] = first_cookie + i
            group["grpid"] = i % 512
            group["dev_id"] = 7
            group["addr"] = addr + 0x1000 * numpy.arange(at, at + size)
            group["flags"][-1] = LAST_PAGE
            at += size
        first, last, malformed = split_groups(records)
        assert not malformed
        read = Read(records, first, last, "vm1", 0.0)
        return Batch(read, numpy.arange(len(read)), self.answer)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def channel_on(ours, read_records: int = 256, **options) -> tuple[FaultChannel, ForwardPolicy]:
    policy = ForwardPolicy("vmm", ForwardOptions(**options))
    channel = FaultChannel(ours, policy, read_records=read_records)
    channel.start()
    return channel, policy


def receive(sock: socket.socket, limit: int = 256) -> numpy.ndarray:
    """One packet, read the way a peer reads: at most ``limit`` records."""
    data, _, flags, _ = sock.recvmsg(limit * 40)
    assert not flags & socket.MSG_TRUNC, "a packet larger than the peer reads at once"
    assert len(data) % 40 == 0
    return numpy.frombuffer(data, record_dtype())


def respond(sock: socket.socket, cookies, codes) -> None:
    out = numpy.empty(len(cookies), RESPONSE)
    out["cookie"], out["code"] = cookies, codes
    sock.send(out.tobytes())


def group_ids(records: numpy.ndarray) -> list[int]:
    return records["cookie"][(records["flags"] & LAST_PAGE) != 0].tolist()


async def until(predicate, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_groups_go_out_as_the_fault_fds_records_with_ids_and_answers_come_back(pair):
    ours, theirs = pair
    engine = Engine()
    _, policy = channel_on(ours)
    batch = engine.batch([1, 3, 1], first_cookie=40)
    assert policy.decide_batch(batch) is None
    records = receive(theirs)
    expected = batch.records()
    assert len(records) == 5
    for field in ("flags", "dev_id", "pasid", "grpid", "perm", "addr", "length"):  # everything but the cookie
        assert (records[field] == expected[field]).all(), field
    ids = group_ids(records)
    assert records["cookie"].tolist() == [ids[0], ids[1], ids[1], ids[1], ids[2]]  # one id per group
    assert len(set(ids)) == 3 and not set(ids) & {40, 41, 42, 0}  # never a kernel cookie, never 0
    respond(theirs, ids, [SUCCESS, INVALID, SUCCESS])
    await until(lambda: len(engine.answers) == 3)
    assert engine.answers == {40: SUCCESS, 41: INVALID, 42: SUCCESS}
    assert (policy.stats.sent, policy.stats.answered, policy.stats.late_answers) == (3, 3, 0)


async def test_packets_hold_whole_groups_within_what_the_peer_reads(pair):
    ours, theirs = pair
    engine = Engine()
    _, policy = channel_on(ours, read_records=8)
    sizes = [3, 3, 3, 1, 8, 2, 5, 1, 1, 1]
    policy.decide_batch(engine.batch(sizes[:6]))
    policy.decide_batch(engine.batch(sizes[6:], first_cookie=7))
    packets = [receive(theirs, 8) for _ in range(5)]
    assert [len(p) for p in packets] == [6, 4, 8, 2, 8]  # greedy per batch, never over 8, no group split
    for packet in packets:
        assert packet["flags"][-1] & LAST_PAGE  # ends with a whole group
    records = numpy.concatenate(packets)
    assert numpy.diff(numpy.flatnonzero(records["flags"] & LAST_PAGE), prepend=-1).tolist() == sizes
    ids = group_ids(records)
    assert ids == list(range(ids[0], ids[0] + 10))  # one contiguous range per batch, in order
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1)  # nothing more


async def test_a_group_larger_than_the_peer_reads_is_answered_invalid_and_the_rest_go(pair):
    ours, theirs = pair
    engine = Engine()
    _, policy = channel_on(ours, read_records=4)
    policy.decide_batch(engine.batch([2, 5, 1], first_cookie=1))
    assert engine.answers == {2: INVALID} and policy.stats.oversized == 1
    records = receive(theirs, 4)
    assert len(records) == 3
    respond(theirs, group_ids(records), [SUCCESS, SUCCESS])
    await until(lambda: len(engine.answers) == 3)
    assert engine.answers == {1: SUCCESS, 2: INVALID, 3: SUCCESS}


async def test_late_duplicate_and_unsent_ids_are_counted_and_ignored(pair):
    ours, theirs = pair
    engine = Engine()
    _, policy = channel_on(ours)
    first, second = engine.batch([1, 1], first_cookie=1), engine.batch([1], first_cookie=3)
    policy.decide_batch(first)
    policy.decide_batch(second)
    old = group_ids(receive(theirs))
    new = group_ids(receive(theirs))
    engine.deadline(first.read)  # the engine answered the first batch at its deadline
    respond(theirs, [*old, new[0], new[0], 999_999], [SUCCESS, SUCCESS, SUCCESS, INVALID, SUCCESS])
    await until(lambda: len(engine.answers) == 3)
    await until(lambda: policy.stats.late_answers == 4)
    assert engine.answers == {1: INVALID, 2: INVALID, 3: SUCCESS}  # the first answer of an id counts
    respond(theirs, new, [INVALID])  # answered already
    await until(lambda: policy.stats.late_answers == 5)
    assert engine.answers[3] == SUCCESS and policy.stats.answered == 1


async def test_answer_packets_received_back_to_back_are_taken_together_as_if_one_by_one(pair, monkeypatch):
    """Answer packets that arrived together are taken in one pass per buffer's worth (numpy's cost is
    per call), and count as if taken one by one: across batches, out of order, the first answer of
    an id counts and a malformed packet's whole responses count."""
    monkeypatch.setattr(peer_channel, "PACKET_ROOM", 3 * 8)  # packets of at most 3 responses ...
    monkeypatch.setattr(peer_channel, "PACKETS_AT_ONCE", 2)  # ... in a buffer of 6
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours)
    taken: list[int] = []
    answers = channel._answers
    monkeypatch.setattr(channel, "_answers", lambda responses: (taken.append(len(responses)), answers(responses)))
    policy.decide_batch(engine.batch([1, 1, 1], first_cookie=1))
    policy.decide_batch(engine.batch([1, 1], first_cookie=4))
    a, b = group_ids(receive(theirs)), group_ids(receive(theirs))
    respond(theirs, [b[1], a[0]], [SUCCESS, INVALID])  # two batches, the later one first
    respond(theirs, [a[0], a[2], a[1]], [SUCCESS, SUCCESS, SUCCESS])  # a[0] again: late
    theirs.send(struct.pack("<II", b[0], INVALID) + b"\x01")  # malformed, with one whole response
    respond(theirs, [b[0]], [SUCCESS])  # late
    await until(lambda: len(engine.answers) == 5 and policy.stats.late_answers == 2)
    assert engine.answers == {1: INVALID, 2: SUCCESS, 3: SUCCESS, 4: INVALID, 5: SUCCESS}
    assert (policy.stats.answered, policy.stats.malformed_packets) == (5, 1)
    assert taken == [5, 2]  # the buffer held two packets (5 responses), then the last two


async def test_whole_batches_answered_in_order_are_taken_without_lookups_and_the_rest_as_usual(pair, monkeypatch):
    """Answers that begin with whole batches, every id once and in order (what a peer sends back), are
    taken batch by batch with no id lookups; what follows them takes the general path."""
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours)
    whole: list[bool] = []
    answer_range = channel._answer_range

    def watched(found, offsets, codes):
        whole.append(offsets is None)
        return answer_range(found, offsets, codes)

    monkeypatch.setattr(channel, "_answer_range", watched)
    for sizes, first_cookie in (([1, 1, 1], 1), ([1, 1], 4), ([1, 1], 6)):
        policy.decide_batch(engine.batch(sizes, first_cookie=first_cookie))
    a, b, c = (group_ids(receive(theirs)) for _ in range(3))
    respond(theirs, [*a, *b, c[1]], [SUCCESS, INVALID, SUCCESS, SUCCESS, INVALID, SUCCESS])  # a and b whole, c in part
    await until(lambda: len(engine.answers) == 6)
    assert whole == [True, True, False]
    respond(theirs, [c[0], a[0]], [INVALID, SUCCESS])  # the rest of c, and a[0] again: late
    await until(lambda: len(engine.answers) == 7 and policy.stats.late_answers == 1)
    assert engine.answers == {1: SUCCESS, 2: INVALID, 3: SUCCESS, 4: SUCCESS, 5: INVALID, 6: INVALID, 7: SUCCESS}
    assert policy.stats.answered == 7 and whole == [True, True, False, False]  # a is forgotten: a[0] maps to none


async def test_a_packet_that_is_not_whole_responses_counts_what_is_whole(pair):
    ours, theirs = pair
    engine = Engine()
    _, policy = channel_on(ours)
    policy.decide_batch(engine.batch([1, 1]))
    ids = group_ids(receive(theirs))
    theirs.send(struct.pack("<II", ids[0], SUCCESS) + b"\x01\x02\x03")
    await until(lambda: policy.stats.malformed_packets == 1)
    assert engine.answers == {1: SUCCESS}
    out = numpy.zeros(protocol.MAX_RESPONSES + 1, RESPONSE)  # one response too many for a packet
    out["cookie"], out["code"] = ids[0], SUCCESS
    out["cookie"][-1] = ids[1]
    theirs.send(out.tobytes())
    await until(lambda: policy.stats.malformed_packets == 2)
    assert engine.answers == {1: SUCCESS} and policy.stats.late_answers == protocol.MAX_RESPONSES


async def test_ids_are_never_reused_while_open_and_wrap_past_2_to_the_32(pair):
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours, read_records=4096)
    channel._next = (1 << 32) - 3  # three ids left before the wrap
    batches = [engine.batch([1] * 2, first_cookie=1), engine.batch([1] * 3, first_cookie=3),
               engine.batch([1] * 2, first_cookie=6)]
    for batch in batches:
        policy.decide_batch(batch)
    ids = [group_ids(receive(theirs, 4096)) for _ in batches]
    assert ids == [[(1 << 32) - 3, (1 << 32) - 2], [1, 2, 3], [4, 5]]  # a range never wraps; 0 is never used
    respond(theirs, [5, (1 << 32) - 3, 1, 2, 3, 4, (1 << 32) - 2], [SUCCESS] * 7)
    await until(lambda: len(engine.answers) == 7)
    assert policy.stats.late_answers == 0
    # Many batches open at once: every open id distinct; answered in any order, each reaches its group.
    many = [engine.batch([1, 2, 1], first_cookie=100 + 3 * i) for i in range(200)]
    for batch in many:
        policy.decide_batch(batch)
    seen = []
    while len(seen) < 600:
        seen += group_ids(receive(theirs, 4096))
    assert len(set(seen)) == 600
    order = numpy.random.default_rng(1).permutation(seen)
    for chunk in numpy.array_split(order, 7):
        respond(theirs, chunk, [SUCCESS] * len(chunk))
    await until(lambda: len(engine.answers) == 607)
    assert policy.stats.late_answers == 0 and not channel._ranges  # every range answered is forgotten


async def test_a_full_socket_does_not_block_and_groups_wait_their_turn(pair):
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours, read_records=16)
    batches = [engine.batch([1] * 4, first_cookie=1 + 4 * i, addr=i << 20) for i in range(1000)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    for batch in batches:
        policy.decide_batch(batch)  # the peer reads nothing yet
    assert loop.time() - started < 1.0
    assert 0 < policy.queued == channel.queued < 4000  # some went, the rest wait for room
    waiting = channel.queued // 4  # the last batches, not sent yet; they will go four to a packet
    expired = batches[1000 - waiting + 4 * (waiting // 8) + 1]  # the second of a packet's four
    engine.deadline(expired.read)  # it expires while it waits: it is never sent
    seen = []
    while len(seen) < 4000 - 4:
        packet = receive(theirs, 16)
        seen += group_ids(packet)
        assert not set(packet["addr"].tolist()) & set(expired.read.records["addr"].tolist())
        respond(theirs, group_ids(packet), [SUCCESS] * len(group_ids(packet)))
        await asyncio.sleep(0)  # the loop sends more as the peer reads
    await until(lambda: len(engine.answers) == 4000)
    assert channel.queued == 0 and len(set(seen)) == 4000 - 4
    assert sum(code == SUCCESS for code in engine.answers.values()) == 4000 - 4
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1)


async def test_one_record_groups_go_in_full_packets_back_to_back_until_the_socket_is_full(pair):
    """Batches of one-record groups go out in full packets back to back; a socket that fills midway
    leaves the rest queued, sent in order once the peer reads: every group once, no packet over what
    the peer reads, and packets full but for a tail with nothing queued behind it."""
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours, read_records=16)
    batches = [engine.batch([1] * 100, first_cookie=1 + 100 * i, addr=i << 20) for i in range(300)]
    for batch in batches:
        policy.decide_batch(batch)  # the peer reads nothing yet
    assert 0 < channel.queued < 30000  # the socket filled midway
    seen, sizes = [], []
    while len(seen) < 30000:
        packet = receive(theirs, 16)
        sizes.append(len(packet))
        seen += group_ids(packet)
        await asyncio.sleep(0)  # the loop sends more as the peer reads
    assert seen == list(range(seen[0], seen[0] + 30000))  # every group once, in order, ids in one run
    # Full packets, but for a few around a batch's tail sent while nothing was queued behind it (before
    # the socket filled); once batches wait, a tail shares a packet with the next one's head.
    assert max(sizes) == 16 and sizes.count(16) > 1800
    respond(theirs, seen[:16], [SUCCESS] * 16)
    await until(lambda: len(engine.answers) == 16)
    assert channel.queued == 0 and policy.stats.sent == 30000


async def test_disconnect_answers_every_open_group_at_once_and_earlier_answers_count(pair):
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours, read_records=4, when_disconnected="success")
    policy.decide_batch(engine.batch([1, 1, 1, 1], first_cookie=1))
    policy.decide_batch(engine.batch([1, 1], first_cookie=5))
    ids = group_ids(receive(theirs, 4))
    respond(theirs, ids[:2], [INVALID, INVALID])
    theirs.close()  # with one packet of ours unread
    await until(lambda: channel.closed)
    assert engine.answers == {1: INVALID, 2: INVALID, 3: SUCCESS, 4: SUCCESS, 5: SUCCESS, 6: SUCCESS}
    assert policy.channel is None and policy.stats.disconnects == 1
    later = engine.batch([1, 1], first_cookie=7)
    assert policy.decide_batch(later).tolist() == [SUCCESS, SUCCESS]  # no peer: when_disconnected


async def test_a_peer_that_died_with_groups_queued_costs_only_those(pair):
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours, read_records=1)
    for i in range(1000):  # more than the socket holds
        policy.decide_batch(engine.batch([1], first_cookie=1 + i))
    assert channel.queued
    ids = group_ids(receive(theirs, 1))
    respond(theirs, ids, [SUCCESS])
    theirs.shutdown(socket.SHUT_RDWR)
    theirs.close()
    await until(lambda: channel.closed)
    assert engine.answers[1] == SUCCESS and sorted(engine.answers) == list(range(1, 1001))
    assert [engine.answers[c] for c in range(2, 1001)] == [INVALID] * 999 and channel.queued == 0


async def test_a_send_to_a_peer_gone_takes_every_answer_it_sent_before_letting_go(pair, monkeypatch):
    monkeypatch.setattr(peer_channel, "MAX_PACKETS_PER_WAKEUP", 8)
    ours, theirs = pair
    engine = Engine()
    channel, policy = channel_on(ours, read_records=1)
    for i in range(30):
        policy.decide_batch(engine.batch([1], first_cookie=1 + i))
    ids = [group_ids(receive(theirs, 1))[0] for _ in range(30)]
    for sent in ids:  # more answer packets than iopfd reads in one wakeup
        respond(theirs, [sent], [SUCCESS])
    theirs.close()
    policy.decide_batch(engine.batch([1], first_cookie=31))  # before the loop sees the end: the send fails
    assert channel.closed and engine.answers == {**{c: SUCCESS for c in range(1, 31)}, 31: INVALID}


async def test_a_second_channel_for_a_taken_policy_is_refused(pair):
    ours, _ = pair
    _, policy = channel_on(ours)
    other, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(RuntimeError, match="already forwards"):
        FaultChannel(other, policy).start()
    other.close()
    theirs.close()


async def test_vevents_reach_the_event_channel_one_per_packet_as_the_veventq_reads():
    faults, fault_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    events, event_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    policy = ForwardPolicy("vmm")
    channel = FaultChannel(faults, policy, events=EventChannel(events, policy))
    channel.start()
    await policy.on_event(Vevent("vm1", "selftest", 4, 0, struct.pack("<I", 99)))
    await policy.on_event(Vevent("vm1", "selftest", 9, 5, None))  # a LOST_EVENTS header
    event_peer.settimeout(5)
    assert event_peer.recv(64) == struct.pack("<III", 0, 4, 99)
    assert event_peer.recv(64) == struct.pack("<II", 1, 9)
    assert policy.stats.events_sent == 2
    fault_peer.close()  # the peer is gone: both channels close
    await until(lambda: channel.closed and channel.events.closed)
    assert policy.event_channel is None
    event_peer.close()


async def test_a_full_event_channel_drops_events_and_says_so_with_a_lost_events_header(monkeypatch):
    monkeypatch.setattr(peer_channel, "MAX_EVENT_BACKLOG", 4)
    faults, fault_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    events, event_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    policy = ForwardPolicy("vmm")
    channel = FaultChannel(faults, policy, events=EventChannel(events, policy))
    channel.start()
    sequence = 0
    while not channel.events.queued:  # fill the socket
        await policy.on_event(Vevent("vm1", "selftest", sequence, 0, struct.pack("<I", sequence)))
        sequence += 1
    for _ in range(10):  # 3 more fit the backlog, 7 are dropped
        await policy.on_event(Vevent("vm1", "selftest", sequence, 0, struct.pack("<I", sequence)))
        sequence += 1
    assert policy.stats.events_dropped == 7
    event_peer.setblocking(False)
    got = []
    while True:
        try:
            got.append(event_peer.recv(64))
        except BlockingIOError:  # the socket is empty: done once nothing waits for room either
            if not channel.events.queued:
                break
            await asyncio.sleep(0.01)
    await policy.on_event(Vevent("vm1", "selftest", sequence, 0, struct.pack("<I", sequence)))
    await asyncio.sleep(0.01)
    got += [event_peer.recv(64), event_peer.recv(64)]
    sequences = [struct.unpack_from("<II", packet) for packet in got]
    assert sequences[-2:] == [(1, sequence - 1), (0, sequence)]  # dropped up to sequence - 1, then the next
    assert [s for _, s in sequences[:-2]] == list(range(sequence - 7))
    channel.close()
    fault_peer.close()
    event_peer.close()


@pytest.mark.parametrize("kind", ["pipe", "stream", "dgram", "unconnected"])
async def test_a_forward_fd_must_be_a_connected_seqpacket_unix_socket(kind, tmp_path):
    opened = []
    if kind == "pipe":
        fd, other = os.pipe()
        opened = [fd, other]
    elif kind == "unconnected":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd = sock.detach()
        opened = [fd]
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if kind == "stream" else socket.SOCK_DGRAM)
        fd = a.detach()
        opened = [fd, b.detach()]
    try:
        with pytest.raises(ValueError, match=r"socketpair\(AF_UNIX, SOCK_SEQPACKET\)"):
            check_channel_socket(fd)
        os.fstat(fd)  # still open: the caller's
    finally:
        for each in opened:
            os.close(each)


async def test_read_records_is_bounded():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(ValueError, match="read_records"):
        FaultChannel(ours, ForwardPolicy("vmm"), read_records=protocol.MAX_READ_RECORDS + 1)
    ours.close()
    theirs.close()


# -- through the engine ------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def served(pair):
    """A queue served by the engine with a forward policy whose channel is ``pair``."""
    made = []

    def serve(deadline: float, read_records: int = 256) -> tuple[EmulatedFaultQueue, QueueResponder, ForwardPolicy]:
        policy = ForwardPolicy("vmm")
        FaultChannel(pair[0], policy, read_records=read_records).start()
        emulated = EmulatedFaultQueue()
        responder = QueueResponder(emulated.open(), policy, QueueConfig("vm1", response_deadline=deadline))
        responder.start()
        made.append((emulated, responder, policy))
        return emulated, responder, policy

    yield serve
    for emulated, responder, policy in made:
        await responder.stop(0)
        if policy.channel is not None:
            policy.channel.close()
        emulated.close()


async def test_the_engine_forwards_through_the_channel_and_its_deadline_holds(pair, served):
    _, theirs = pair
    emulated, responder, policy = served(0.3)
    for i in range(6):
        emulated.report(PageRequest(dev_id=3, addr=0x1000 * (i + 1)))
    records = []
    while len(records) < 6:
        records += list(await asyncio.to_thread(receive, theirs))
    records = numpy.array(records, record_dtype())
    ids = group_ids(records)
    respond(theirs, ids[:4], numpy.where(records["addr"][:4] < 0x3000, SUCCESS, INVALID))  # 2 left unanswered
    await until(lambda: len(emulated.answers) == 6)  # the last two at the deadline
    assert [code for _, code in emulated.answers] == [SUCCESS, SUCCESS, INVALID, INVALID, INVALID, INVALID]
    assert responder.stats.outcomes["deadline"] == 2
    respond(theirs, ids[4:], [SUCCESS, SUCCESS])  # too late
    await until(lambda: policy.stats.late_answers == 2)
    assert len(emulated.answers) == 6


async def test_the_engine_answers_when_disconnected_once_the_peer_goes(pair, served):
    _, theirs = pair
    emulated, responder, policy = served(30)
    for i in range(3):
        emulated.report(PageRequest(dev_id=3, addr=0x1000 * (i + 1)))
    ids = group_ids(await asyncio.to_thread(receive, theirs))
    while len(ids) < 3:
        ids += group_ids(await asyncio.to_thread(receive, theirs))
    respond(theirs, ids[:1], [SUCCESS])
    theirs.close()
    await until(lambda: len(emulated.answers) == 3)
    assert [code for _, code in emulated.answers] == [SUCCESS, INVALID, INVALID]
    assert responder.stats.outcomes["deadline"] == 0 and policy.channel is None
    emulated.report(PageRequest(dev_id=3, addr=0x9000))
    await until(lambda: len(emulated.answers) == 4)
    assert emulated.answers[-1][1] == INVALID


async def test_the_engine_takes_an_answer_made_while_the_batch_is_handed_over(pair, served):
    _, theirs = pair
    emulated, responder, policy = served(30, read_records=2)
    emulated.report(PageRequest(dev_id=3, addr=0x1000, grpid=1, last=False))  # a group of three records
    emulated.report(PageRequest(dev_id=3, addr=0x2000, grpid=1, last=False))
    emulated.report(PageRequest(dev_id=3, addr=0x3000, grpid=1))
    emulated.report(PageRequest(dev_id=3, addr=0x4000, grpid=2))
    records = await asyncio.to_thread(receive, theirs, 2)
    assert records["addr"].tolist() == [0x4000]
    respond(theirs, group_ids(records), [SUCCESS])
    await until(lambda: len(emulated.answers) == 2)
    assert sorted((len(group), code) for group, code in emulated.answers) == [(1, SUCCESS), (3, INVALID)]
    assert policy.stats.oversized == 1 and responder.pending == 0


async def test_a_code_other_than_success_or_invalid_answers_that_group_invalid_as_an_error(pair, served):
    _, theirs = pair
    emulated, responder, policy = served(30)
    for i in range(3):
        emulated.report(PageRequest(dev_id=3, addr=0x1000 * (i + 1)))
    ids = []
    while len(ids) < 3:
        ids += group_ids(await asyncio.to_thread(receive, theirs))
    respond(theirs, ids, [SUCCESS, 7, SUCCESS])
    await until(lambda: len(emulated.answers) == 3)
    assert sorted((group[0].addr, code) for group, code in emulated.answers) == [
        (0x1000, SUCCESS), (0x2000, INVALID), (0x3000, SUCCESS)]
    assert responder.stats.outcomes["error"] == 1 and policy.stats.bad_codes == 1


async def test_the_metrics_show_the_peer_and_the_groups_queued_for_it(pair):
    from iopfd.engine import Engine as RealEngine
    from iopfd.service.metrics import EngineCollector

    ours, _ = pair
    policy = ForwardPolicy("vmm", ForwardOptions())

    def figures() -> dict[str, float]:
        collector = EngineCollector(RealEngine(), None, lambda: {"vmm": policy})
        return {sample.name: sample.value for family in collector.collect() for sample in family.samples
                if sample.name.startswith("iopfd_peer_")}

    assert figures() == {"iopfd_peer_queued_groups": 0, "iopfd_peer_sent_groups_total": 0,
                         "iopfd_peer_late_answers_total": 0, "iopfd_peer_connected": 0}
    engine = Engine()
    channel = FaultChannel(ours, policy, read_records=16)
    channel.start()
    for i in range(1000):  # far more than the socket holds: the peer reads nothing yet
        policy.decide_batch(engine.batch([1] * 4, first_cookie=1 + 4 * i, addr=i << 20))
    shown = figures()
    assert shown["iopfd_peer_connected"] == 1 and shown["iopfd_peer_queued_groups"] == channel.queued > 0
    assert shown["iopfd_peer_sent_groups_total"] == 4000 - channel.queued
