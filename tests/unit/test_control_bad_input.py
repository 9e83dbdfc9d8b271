"""Bad input on the control socket: every message gets an error reply with a code (an empty packet
ends the connection), every fd the server refuses is closed, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import re
import resource
import select
import socket
import time

import pytest
import pytest_asyncio
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from iopfd import protocol
from iopfd.client import Client
from iopfd.iommufd import FaultQueue
from iopfd.iommufd.context import describe_fd
from iopfd.iommufd.errors import IommufdUnavailable
from iopfd.service.control import ops
from iopfd.service.control.transport import ControlSocket, bind_socket
from iopfd.service.logging import configure_logging
from server_in_loop import servers_in_loop

CODES = {"bad-request", "unsupported-version", "unknown-op", "too-large", "too-many-fds", "missing-fd",
         "not-a-fault-fd", "queue-exists", "no-such-queue", "no-such-policy", "not-a-forward-policy",
         "policy-taken", "broker-failed", "unauthorized"}  # docs/protocol.md, "Error codes"
POLICIES = {"accept", "reject", "fwd"}  # the fixture's: two built in, one forward table
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
V = protocol.VERSION
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class StandInFaultQueue(FaultQueue):
    """An eventfd passes for a fault fd, so an attach can succeed without a kernel (it never reads
    anything); every other fd gets the real check."""

    @classmethod
    def adopt(cls, fd: int, *args, **kwargs) -> FaultQueue:
        if describe_fd(fd) == "anon_inode:[eventfd]":
            return cls(None, 0, fd)
        return FaultQueue.adopt(fd)

    def _readinto(self, buffer: bytearray) -> int:
        return 0

    def _has_input(self) -> bool:
        return False


class NoIommufd:
    """broker fails the same way on every host, /dev/iommu or not."""

    @staticmethod
    def open():
        raise IommufdUnavailable("open /dev/iommu", errno.ENOENT, "no iommufd in the unit tests")


@pytest_asyncio.fixture
async def daemon(tmp_path, monkeypatch):
    """A serving daemon with its control socket; fails the test if a connection task ended with an
    exception or a callback raised (a dropped connection the peer cannot tell from a refusal)."""
    monkeypatch.setattr(ops, "FaultQueue", StandInFaultQueue)
    monkeypatch.setattr(ops, "Iommufd", NoIommufd)
    configure_logging("info", "json", stream=io.StringIO())  # the daemon's own renderer, off the terminal
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    tasks: list[asyncio.Task] = []
    loop.set_task_factory(lambda loop, coro, **kw: tasks.append(asyncio.Task(coro, loop=loop, **kw)) or tasks[-1])
    async with servers_in_loop(tmp_path, watch_devices=False, policies={"fwd": {"type": "forward"}}) as start:
        yield start
    loop.set_task_factory(None)
    loop.set_exception_handler(None)
    structlog.reset_defaults()
    assert loop_errors == []
    assert [task.exception() for task in tasks if task.done() and not task.cancelled() and task.exception()] == []


# -- blocking helpers, run in a thread while the daemon serves on the test's loop ------------------
def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle_fds(expected: int, timeout: float = 5.0) -> None:
    """Wait for the server to close what it should (it closes a connection when it sees the EOF)."""
    deadline = time.monotonic() + timeout
    while fd_count() != expected:
        assert time.monotonic() < deadline, f"{fd_count() - expected} fds leaked"
        time.sleep(0.002)


def connect(path: str) -> socket.socket:
    """A raw socket, connected as iopfd.client connects (waiting while the daemon's backlog is full)."""
    return Client(path, timeout=5).sock


def reply_to(sock: socket.socket, data: bytes, fds: list[int] = ()) -> dict | None:
    """Send one raw packet; its reply, or None when the server closed the connection instead."""
    socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    answer = sock.recv(protocol.MAX_MESSAGE)
    return json.loads(answer) if answer else None


def exchange(path: str, data: bytes, fds: list[int] = ()) -> dict | None:
    with connect(path) as sock:
        return reply_to(sock, data, fds)


def serves(path: str) -> bool:
    """A well-formed status on a new connection is answered."""
    with Client(path, timeout=5) as client:
        return client.status()["ok"]


def open_fds(kinds: list[str], tmp_path) -> tuple[list[int], list[int]]:
    """One fd to send per kind, and every fd opened (to close afterwards)."""
    sent, opened = [], []
    for kind in kinds:
        if kind == "pipe":
            fd, other = os.pipe()
            opened.append(other)
        elif kind == "socket":
            fd, other = (end.detach() for end in socket.socketpair())
            opened.append(other)
        elif kind == "epoll":
            with select.epoll() as epoll:
                fd = os.dup(epoll.fileno())
        else:
            fd = {"file": lambda: os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR),
                  "null": lambda: os.open("/dev/null", os.O_RDWR),
                  "directory": lambda: os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
                  "memfd": lambda: os.memfd_create("not-a-fault-queue"),
                  "eventfd": lambda: os.eventfd(0)}[kind]()  # eventfd: the stand-in fault fd
        opened.append(fd)
        sent.append(fd)
    return sent, opened


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def is_error(reply: dict | None, *codes: str) -> bool:
    return (reply is not None and reply["ok"] is False and reply["error"]["code"] in (codes or CODES)
            and isinstance(reply["error"]["message"], str) and len(reply["error"]["message"]) > 10)


# -- what a fuzzed request should get ------------------------------------------------------------
def carried_out(message: dict, kinds: list[str]) -> bool:
    """Whether iopfd must carry out this request; anything else gets an error reply."""
    op, version = message["op"], message.get("v")
    if version != V or isinstance(version, bool):
        return False
    if kinds != (["eventfd"] if op == "attach" else []):
        return False
    if op == "status":
        return True
    if op == "forward":
        records, events = message.get("read_records", 256), message.get("events", False)
        return (message.get("policy") == "fwd" and type(records) is int and 1 <= records <= protocol.MAX_READ_RECORDS
                and type(events) is bool)
    if op == "attach":
        policy, labels, devices = message.get("policy"), message.get("labels"), message.get("devices")
        return (isinstance(message.get("queue"), str) and NAME.fullmatch(message["queue"]) is not None
                and (policy is None or (isinstance(policy, str) and policy in POLICIES))
                and strings(labels) and "queue" not in (labels or {})
                and strings(devices) and all(re.fullmatch("[0-9]{1,10}", key) for key in devices or {}))
    return False  # detach: nothing is served; broker: no iommufd


def strings(value) -> bool:
    return value is None or (isinstance(value, dict) and all(isinstance(item, str) for item in value.values()))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
names = st.from_regex(NAME, fullmatch=True) | st.sampled_from(["a" * 65, "", "no spaces", "vm1\n"]) \
    | st.text(max_size=70)
policy_names = st.sampled_from([*sorted(POLICIES), "nope", "", "a" * 100])
string_maps = st.dictionaries(st.sampled_from(["vm", "queue", "1", "42", "-1", "99999999999", "٣", ""])
                              | st.text(max_size=6), st.text(max_size=8), max_size=3)
FIELDS = {
    "attach": {"queue": names, "policy": policy_names, "labels": string_maps, "devices": string_maps},
    "detach": {"queue": names},
    "broker": {"queue": names, "policy": policy_names, "labels": string_maps},
    "status": {},
    "forward": {"policy": policy_names, "read_records": st.integers(-1, protocol.MAX_READ_RECORDS + 1),
                "events": st.booleans()},
}


def mostly(plausible, other=json_values):
    """Mostly plausible values, so that requests get past the first checks often enough to meet the later ones."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda pick: plausible if pick else other)


def requests(op: str):
    """Every field of ``op`` present or not, plausible or any JSON value; unknown fields too."""
    fields = st.fixed_dictionaries({"op": st.just(op), "v": mostly(st.just(V))}, optional={  # no v: another test
        "id": json_values, **{key: mostly(values) for key, values in FIELDS[op].items()}})
    return st.tuples(st.dictionaries(st.text(max_size=8), json_values, max_size=2), fields).map(
        lambda pair: {**pair[0], **pair[1]})


def fd_kinds(op: str):
    """The fds sent with ``op``: mostly the right ones (attach: one stand-in fault fd)."""
    return mostly(st.just(["eventfd"] if op == "attach" else []),
                  st.lists(st.sampled_from(["eventfd", "pipe", "socket", "file", "null"]), max_size=2))


# -- fuzzing ---------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_random_bytes_get_bad_request_and_the_daemon_serves_on(daemon):
    _, path = await daemon()

    @FUZZ
    @given(st.binary(min_size=1, max_size=200) | st.text(min_size=1, max_size=60).map(str.encode))
    def check(data):
        reply = exchange(path, data)
        assert is_error(reply, "bad-request", "unsupported-version", "unknown-op"), (data, reply)
        assert reply["error"]["code"] != "bad-request" or "JSON" in reply["error"]["message"], reply  # the cause
        assert serves(path)

    await asyncio.to_thread(check)


@pytest.mark.asyncio
async def test_random_json_values_get_an_error_reply(daemon):
    _, path = await daemon()

    @FUZZ
    @given(json_values)
    def check(value):
        reply = exchange(path, json.dumps(value).encode())
        if not isinstance(value, dict):
            expected = ("bad-request",)
        elif value.get("v") != V or isinstance(value.get("v"), bool):
            expected = ("unsupported-version",)
        else:
            expected = ("unknown-op",) if "op" not in value else ()
        assert is_error(reply, *expected), (value, reply)
        assert serves(path)

    await asyncio.to_thread(check)


@pytest.mark.parametrize("op", sorted(FIELDS))
@pytest.mark.asyncio
async def test_requests_with_random_missing_or_wrong_typed_fields(daemon, tmp_path, op):
    server, path = await daemon()
    forward = server.policies.get("fwd")
    baseline = await asyncio.to_thread(fd_count)

    @FUZZ
    @given(requests(op), fd_kinds(op))
    def check(message, kinds):
        sent, opened = open_fds(kinds, tmp_path)
        try:
            reply = exchange(path, json.dumps(message).encode(), sent)
        finally:
            close_all(opened)
        assert reply is not None, "the connection was dropped"
        if carried_out(message, kinds):
            assert reply["ok"] is True, (message, kinds, reply)
        else:
            assert is_error(reply), (message, kinds, reply)
        if reply["ok"] or reply["error"]["code"] != "unsupported-version":  # a refused version is not read further
            assert reply["id"] == message.get("id")
        if reply["ok"] and op == "attach":
            with Client(path, timeout=5) as client:
                assert client.detach(message["queue"])["queue"] == message["queue"]
        assert serves(path)
        settle_fds(baseline)  # every fd received was closed or, attached, closed by the detach
        deadline = time.monotonic() + 5
        while forward.channel is not None:  # the channel's fd was not received (so closed): iopfd let go of it
            assert time.monotonic() < deadline
            time.sleep(0.001)

    await asyncio.to_thread(check)


# -- messages no fuzzer finds ----------------------------------------------------------------------
@pytest.mark.parametrize(("data", "code", "says"), [
    pytest.param(b"[" * 60000, "bad-request", "nested too deeply", id="deep"),
    pytest.param(b'{"v":%d,"op":"status","id":' % V + b"7" * 5000 + b"}", "bad-request", "digits", id="long-number"),
    pytest.param(b'{"v":%d,"op":"status","id":NaN}' % V, "bad-request", "NaN is not a JSON number", id="nan"),
    pytest.param(b'{"v":%d,"op":"status","id":-Infinity}' % V, "bad-request", "-Infinity", id="infinity"),
    pytest.param(b'{"v":%d,"op":"status","id":1e999}' % V, "bad-request", "beyond a double", id="overflow"),
    pytest.param(b'{"v":%d,"op":"status","id":"\xff"}' % V, "bad-request", "not a JSON message", id="not-utf8"),
    pytest.param(json.dumps({"v": V, "op": "status", "id": "x" * 60000}).encode(), "bad-request", "id: at most",
                 id="long-id"),
    pytest.param(json.dumps({"v": V, "op": "status", "id": "\U0001f600" * 10000}, ensure_ascii=False).encode(),
                 "bad-request", "id: at most", id="id-longer-escaped"),  # 40 000 bytes, 120 000 escaped
    pytest.param(json.dumps({"v": V, "op": "x" * 60000}).encode(), "unknown-op", "unknown op 'xxx", id="long-op"),
    pytest.param(json.dumps({"v": "x" * 60000, "op": "status"}).encode(), "unsupported-version", "got 'xxx",
                 id="long-version"),
    pytest.param(json.dumps({"v": V, "op": ["status"]}).encode(), "unknown-op", "ops: attach", id="op-list"),
    pytest.param(json.dumps({"v": V, "op": "detach", "queue": ["vm1"]}).encode(), "bad-request", "queue:",
                 id="detach-queue-list"),
    pytest.param(json.dumps({"v": V, "op": "detach", "queue": "q" * 60000}).encode(), "bad-request", "queue:",
                 id="detach-long-queue"),
    pytest.param(json.dumps({"v": V, "op": "forward"}).encode(), "bad-request", "policy:", id="forward-no-policy"),
    pytest.param(json.dumps({"v": V, "op": "forward", "policy": "p" * 60000}).encode(), "no-such-policy",
                 "no policy is named", id="forward-long-policy"),
    pytest.param(json.dumps({"v": V, "op": "forward", "policy": "fwd", "read_records": True}).encode(), "bad-request",
                 "read_records:", id="forward-records-true"),
    pytest.param(json.dumps({"v": V, "op": "forward", "policy": "fwd", "events": 1}).encode(), "bad-request",
                 "events:", id="forward-events-one"),
    pytest.param(json.dumps({"v": V, "op": "respond", "group": 1, "code": "success"}).encode(), "unknown-op",
                 "ops: attach, detach, broker, status, forward", id="respond-is-gone"),
])
@pytest.mark.asyncio
async def test_pathological_messages_get_a_short_error_naming_the_cause(daemon, data, code, says):
    _, path = await daemon()
    reply = await asyncio.to_thread(exchange, path, data)
    assert is_error(reply, code) and says in reply["error"]["message"], reply
    assert len(reply["error"]["message"]) < 400  # what the peer sent is quoted, not echoed whole
    assert await asyncio.to_thread(serves, path)


@pytest.mark.asyncio
async def test_ids_nested_up_to_what_the_decoder_reads_get_a_reply(daemon):
    """The reply echoes the id, encoded a few calls deeper than it was decoded: ids the decoder
    just managed to read once failed to encode, and their connection dropped without a reply."""
    _, path = await daemon()
    depths = [protocol.MAX_ID_DEPTH, protocol.MAX_ID_DEPTH + 1, *range(800, 1001)]

    def run():
        return [exchange(path, b'{"v":%d,"op":"status","id":' % V + b"[" * depth + b"]" * depth + b"}")
                for depth in depths]

    replies = await asyncio.to_thread(run)
    assert replies[0]["ok"] and replies[0]["id"] == json.loads("[" * depths[0] + "]" * depths[0])
    for depth, reply in zip(depths[1:], replies[1:]):
        assert is_error(reply, "bad-request") and "nested" in reply["error"]["message"], (depth, reply)


@pytest.mark.parametrize("version", [1, 3, "2", None, True, 2.5, [2], "missing"])
@pytest.mark.asyncio
async def test_other_protocol_versions_are_refused_and_the_connection_stays_usable(daemon, version):
    _, path = await daemon()
    message = {"op": "status", "id": 1} | ({} if version == "missing" else {"v": version})

    def run():
        with connect(path) as sock:
            return reply_to(sock, json.dumps(message).encode()), reply_to(sock, protocol.encode({"op": "status"}))

    refused, answered = await asyncio.to_thread(run)
    assert is_error(refused, "unsupported-version") and f'"v": {V}' in refused["error"]["message"]
    assert answered["ok"]


@pytest.mark.asyncio
async def test_an_empty_packet_closes_only_its_connection(daemon):
    """SOCK_SEQPACKET cannot tell an empty packet from the end of the connection (docs/protocol.md)."""
    _, path = await daemon()
    assert await asyncio.to_thread(exchange, path, b"") is None
    assert await asyncio.to_thread(serves, path)


@pytest.mark.parametrize("size", [protocol.MAX_MESSAGE + 1, 100_000, 200_000])
@pytest.mark.parametrize("with_fds", [0, 2])
@pytest.mark.asyncio
async def test_oversized_messages_are_refused_and_their_fds_closed(daemon, tmp_path, size, with_fds):
    _, path = await daemon()

    def run():
        baseline = fd_count()
        sent, opened = open_fds(["pipe"] * with_fds, tmp_path)
        body = protocol.encode({"op": "status"})
        with connect(path) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            try:
                refused = reply_to(sock, body[:-1] + b',"pad":"' + b"x" * (size - len(body) - 9) + b'"}', sent)
            finally:
                close_all(opened)
            answered = reply_to(sock, body)
        settle_fds(baseline)
        return refused, answered

    refused, answered = await asyncio.to_thread(run)
    assert is_error(refused, "too-large") and "65536" in refused["error"]["message"]
    assert answered["ok"]


@pytest.mark.parametrize(("op", "kinds", "code"), [
    ("attach", [], "missing-fd"),
    ("attach", ["eventfd", "eventfd"], "bad-request"),  # a second fd (a vEVENTQ) needs veventq_type
    ("attach", ["eventfd"] * 3, "missing-fd"),
    ("attach", ["pipe"] * 4, "missing-fd"),
    ("attach", ["eventfd"] * 5, "too-many-fds"),
    ("status", ["pipe"], "bad-request"),
    ("status", ["eventfd"] * 5, "too-many-fds"),
    ("detach", ["eventfd"], "bad-request"),
    ("forward", ["null"], "bad-request"),
    ("broker", ["socket", "file"], "bad-request"),
])
@pytest.mark.asyncio
async def test_wrong_fd_counts_are_refused_and_every_fd_closed(daemon, tmp_path, op, kinds, code):
    _, path = await daemon()

    def run():
        baseline = fd_count()
        sent, opened = open_fds(kinds, tmp_path)
        try:
            reply = exchange(path, protocol.encode({"op": op, "queue": "vm1", "policy": "fwd"}), sent)
        finally:
            close_all(opened)
        settle_fds(baseline)
        return reply

    reply = await asyncio.to_thread(run)
    assert is_error(reply, code), reply
    assert await asyncio.to_thread(serves, path)


@pytest.mark.asyncio
async def test_the_most_fds_one_message_can_carry_are_all_closed(daemon):
    _, path = await daemon()

    def run():
        baseline = fd_count()
        fds = [os.eventfd(0) for _ in range(253)]  # SCM_MAX_FD
        try:
            reply = exchange(path, protocol.encode({"op": "attach", "queue": "vm1"}), fds)
        finally:
            close_all(fds)
        settle_fds(baseline)
        return reply

    assert is_error(await asyncio.to_thread(run), "too-many-fds")


@pytest.mark.parametrize("kind", ["pipe", "file", "socket", "null", "directory", "epoll", "memfd"])
@pytest.mark.asyncio
async def test_an_fd_of_the_wrong_kind_is_refused_naming_what_it_is_and_closed(daemon, tmp_path, kind):
    _, path = await daemon()
    what = {"pipe": "pipe:[", "socket": "socket:[", "file": str(tmp_path / "plain"), "null": "/dev/null",
            "directory": str(tmp_path), "epoll": "anon_inode:[eventpoll]", "memfd": "/memfd:not-a-fault-queue"}[kind]

    def run():
        baseline = fd_count()
        sent, opened = open_fds([kind], tmp_path)
        try:
            reply = exchange(path, protocol.encode({"op": "attach", "queue": "vm1"}), sent)
        finally:
            close_all(opened)
        settle_fds(baseline)
        return reply

    reply = await asyncio.to_thread(run)
    assert is_error(reply, "not-a-fault-fd") and what in reply["error"]["message"], reply
    assert "IOMMU_FAULT_QUEUE_ALLOC" in reply["error"]["message"]  # the fix
    assert await asyncio.to_thread(serves, path)


@pytest.mark.asyncio
async def test_a_refused_peer_has_its_fds_closed_and_others_are_served(daemon, tmp_path):
    server, path = await daemon()
    refusing_path = str(tmp_path / "refusing.sock")
    refusing = ControlSocket(server.control_state(), bind_socket(refusing_path, 0o660), allowed_uids=set(),
                             allowed_gids=set(),
                             owns_path=refusing_path)
    refusing.start()

    def run():
        baseline = fd_count()
        sent, opened = open_fds(["eventfd", "pipe"], tmp_path)
        with connect(refusing_path) as sock:
            try:
                socket.send_fds(sock, [protocol.encode({"op": "attach", "queue": "vm1"})], sent)
            finally:
                close_all(opened)
            refusal = json.loads(sock.recv(protocol.MAX_MESSAGE))
            assert sock.recv(protocol.MAX_MESSAGE) == b""  # then the connection is closed
        settle_fds(baseline)
        return refusal

    refusal = await asyncio.to_thread(run)
    await refusing.close()
    assert is_error(refusal, "unauthorized") and "allowed_uids" in refusal["error"]["message"]
    assert "vm1" not in server.engine.queues
    assert await asyncio.to_thread(serves, path)


@pytest.mark.parametrize("fields", [
    {"policy": ""}, {"policy": 0}, {"policy": False}, {"labels": []}, {"labels": {"vm": 1}},
    {"labels": {"queue": "x"}},  # log lines name the queue "queue": such a label made the attach raise
    {"devices": {"x": "y"}}, {"devices": {"1": None}}])
@pytest.mark.asyncio
async def test_attach_fields_of_the_wrong_shape_are_refused_before_the_fd_is_adopted(daemon, fields):
    server, path = await daemon()
    baseline = await asyncio.to_thread(fd_count)
    reply = await asyncio.to_thread(attach_eventfd, path, fields)
    assert is_error(reply, "bad-request", "no-such-policy") and next(iter(fields)) in reply["error"]["message"], reply
    assert server.engine.queues == {}
    await asyncio.to_thread(settle_fds, baseline)


def attach_eventfd(path: str, fields: dict) -> dict | None:
    fd = os.eventfd(0)
    try:
        return exchange(path, protocol.encode({"op": "attach", "queue": "vm1", **fields}), [fd])
    finally:
        os.close(fd)


# -- many peers ------------------------------------------------------------------------------------
@pytest.fixture
def fd_limit():
    """Room for 1000 connections counted twice (both ends live in this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.asyncio
async def test_a_burst_of_1000_connections(daemon, fd_limit):
    _, path = await daemon()

    def burst():
        baseline = fd_count()
        held = []
        for i in range(1000):
            sock = connect(path)
            if i % 4 == 0:
                sock.close()  # connects and leaves
            elif i % 4 == 1:
                sock.send(protocol.encode({"op": "status"}))
                sock.close()  # leaves before its reply
            elif i % 4 == 2:
                sock.send(b"\x00garbage")
                held.append(sock)
            else:
                held.append(sock)  # connected, silent
        assert serves(path)  # with 500 connections still open
        for sock in held:
            sock.close()
        settle_fds(baseline, timeout=10)

    await asyncio.to_thread(burst)
    assert await asyncio.to_thread(serves, path)


@pytest.mark.asyncio
async def test_running_out_of_fds_delays_accepting_but_does_not_end_it(daemon):
    _, path = await daemon()
    baseline = await asyncio.to_thread(fd_count)
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open("/dev/null", os.O_RDONLY)
    os.close(lowest_free)
    with capture_logs() as logs:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new fd from here on: EMFILE
        try:
            for client in clients:
                client.setblocking(False)
                client.connect(path)  # waits in the backlog
            async with asyncio.timeout(5):
                while not any(entry["event"].startswith("cannot accept") for entry in logs):
                    await asyncio.sleep(0.01)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for client in clients:
        client.close()
    assert await asyncio.to_thread(serves, path)
    await asyncio.to_thread(settle_fds, baseline)
