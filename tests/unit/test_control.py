"""The control socket on the host: what needs no kernel (refusals, status, protocol errors, forward)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy
import pytest
import pytest_asyncio

from iopfd import protocol
from iopfd.client import Client
from iopfd.iommufd import INVALID, SUCCESS
from iopfd.protocol import ProtocolError
from iopfd.service.control.transport import bind_socket
from iopfd_dev.daemon import AS_SYSTEMD
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest
from server_in_loop import servers_in_loop, start_server


@pytest_asyncio.fixture
async def daemon(tmp_path):
    """A running Server with its control socket in tmp_path; ``allow`` picks the authorised uids."""
    async with servers_in_loop(tmp_path) as start:
        yield start
    assert not os.path.exists(tmp_path / "control.sock")  # removed on exit


def call(path, method, *args, **kwargs):
    def run():
        with Client(path, timeout=10) as client:
            return getattr(client, method)(*args, **kwargs)
    return asyncio.to_thread(run)


@pytest.mark.asyncio
async def test_status_of_an_empty_daemon(daemon):
    _, path = await daemon()
    status = await call(path, "status")
    assert status["ok"] and status["queues"] == [] and status["totals"]["pending"] == 0
    assert status["v"] == protocol.VERSION


@pytest.mark.parametrize("kind", ["pipe", "file"])
@pytest.mark.asyncio
async def test_attach_refuses_a_pipe_or_a_file_naming_what_it_is(daemon, tmp_path, kind):
    _, path = await daemon()
    if kind == "pipe":
        fd, other = os.pipe()
    else:
        fd, other = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR), None
    try:
        with pytest.raises(ProtocolError) as refused:
            await call(path, "attach", fd, "vm1")
    finally:
        os.close(fd)
        if other is not None:
            os.close(other)
    assert refused.value.code == "not-a-fault-fd"
    assert ("pipe:[" if kind == "pipe" else str(tmp_path / "plain")) in refused.value.message
    assert "not an iommufd fault fd" in refused.value.message


@pytest.mark.asyncio
async def test_requests_that_break_the_rules_are_refused_with_a_code(daemon):
    _, path = await daemon()
    read_end, write_end = os.pipe()
    try:
        for op, fds, fields, code in [
            ("attach", (), {"queue": "vm1"}, "missing-fd"),
            ("attach", (read_end, write_end), {"queue": "vm1"}, "bad-request"),  # a second fd needs veventq_type
            ("attach", (read_end,), {"queue": "no spaces"}, "bad-request"),
            ("attach", (read_end,), {"queue": "vm1", "policy": "nope"}, "no-such-policy"),
            ("detach", (), {"queue": "vm9"}, "no-such-queue"),
            ("forward", (), {"policy": "accept"}, "not-a-forward-policy"),
            ("reboot", (), {}, "unknown-op"),
        ]:
            with pytest.raises(ProtocolError) as refused:
                await call(path, "request", op, fds, **fields)
            assert refused.value.code == code, (op, fields)
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.asyncio
async def test_a_wrong_version_and_garbage_get_errors_and_the_connection_stays_usable(daemon):
    _, path = await daemon()

    def run():
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(10)
            sock.connect(path)
            replies = []
            for data in (b'{"v": 99, "op": "status"}', b"not json", b"[1]", protocol.encode({"op": "status"})):
                sock.send(data)
                replies.append(protocol.decode(sock.recv(65536)))
            return replies

    old, garbage, array, ok = await asyncio.to_thread(run)
    assert old["error"]["code"] == "unsupported-version"
    assert garbage["error"]["code"] == array["error"]["code"] == "bad-request"
    assert ok["ok"]


@pytest.mark.asyncio
async def test_an_unauthorised_peer_is_refused_and_logged(daemon):
    _, path = await daemon(allowed_uids=[])
    with pytest.raises(ProtocolError) as refused:
        await call(path, "status")
    assert refused.value.code == "unauthorized"


@pytest.mark.asyncio
async def test_forward_over_the_socket_with_the_emulated_queue(daemon):
    server, path = await daemon(policies={"vm": {"type": "forward"}})
    emulated = EmulatedFaultQueue()
    server.queues.add("vm1", emulated.open(), policy="vm")
    policy = server.policies.get("vm")

    def peer():
        with Client(path, timeout=10) as client:
            channel = client.forward("vm", read_records=2)
            seen = []

            def decide(records):
                seen.append(len(records))
                return numpy.where(records["addr"] < 0x3000, SUCCESS, INVALID)

            with channel:
                return channel.serve(decide, count=4), seen

    answering = asyncio.create_task(asyncio.to_thread(peer))
    while policy.channel is None:
        await asyncio.sleep(0.001)
    for i in range(4):
        emulated.report(PageRequest(dev_id=7, addr=0x1000 * (i + 1)))
    answered, packets = await asyncio.wait_for(answering, 10)
    assert answered == 4 and max(packets) <= 2
    while len(emulated.answers) < 4:
        await asyncio.sleep(0.001)
    assert [code for _, code in emulated.answers] == [SUCCESS, SUCCESS, INVALID, INVALID]
    while policy.channel is not None:  # the peer closed its end: the policy is disconnected
        await asyncio.sleep(0.001)
    emulated.report(PageRequest(dev_id=7, addr=0x1000))
    while len(emulated.answers) < 5:
        await asyncio.sleep(0.001)
    assert emulated.answers[-1][1] == INVALID  # when_disconnected
    status = await call(path, "status")
    assert status["queues"][0]["name"] == "vm1" and status["queues"][0]["outcomes"]["success"] == 2
    reply = await call(path, "detach", "vm1")
    assert reply["queue"] == "vm1" and "vm1" not in server.engine.queues
    emulated.close()


@pytest.mark.asyncio
async def test_forward_hands_over_the_channel_and_a_second_peer_is_refused(daemon):
    server, path = await daemon(policies={"vm": {"type": "forward"}})
    policy = server.policies.get("vm")

    def peers():
        with Client(path, timeout=10) as client:
            channel = client.forward("vm", read_records=64, events=True)
            kind = channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            with pytest.raises(ProtocolError) as taken:
                client.forward("vm")
            with pytest.raises(ProtocolError) as too_many:
                client.forward("vm", read_records=protocol.MAX_READ_RECORDS + 1)
            status = client.status()  # the connection still serves requests
            return channel, kind, taken.value.code, too_many.value.code, status

    channel, kind, taken, too_many, status = await asyncio.to_thread(peers)
    assert kind == socket.SOCK_SEQPACKET and channel.events is not None
    assert (taken, too_many, status["ok"]) == ("policy-taken", "bad-request", True)
    assert policy.channel is not None and policy.channel.read_records == 64 and policy.event_channel is not None
    channel.close()  # the channel outlives the control connection, until the peer closes it
    while policy.channel is not None or policy.event_channel is not None:
        await asyncio.sleep(0.001)
    assert not server.channels


@pytest.mark.asyncio
async def test_a_stale_socket_file_is_replaced_and_a_live_one_is_not(tmp_path):
    path = str(tmp_path / "c.sock")
    first = bind_socket(path, 0o600)
    with pytest.raises(OSError, match="another iopfd is listening"):
        bind_socket(path, 0o600)
    first.close()  # the file stays, nobody listens: a crashed daemon's leftover
    second = bind_socket(path, 0o640)
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    second.close()
    (tmp_path / "plain").write_text("")
    with pytest.raises(OSError, match="is not a socket"):
        bind_socket(str(tmp_path / "plain"), 0o600)


def test_socket_activation_uses_the_socket_systemd_passes(tmp_path):
    """iopfd.socket: systemd listens, passes the socket as fd 3 named "control"; iopfd serves on it."""
    import signal
    import subprocess
    import sys
    import time

    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control", "IOPFD_WATCH_DEVICES": "false",
           "IOPFD_CONTROL__PATH": str(tmp_path / "never-bound.sock")}
    daemon = subprocess.Popen([sys.executable, "-c", AS_SYSTEMD, str(listener.fileno()), sys.executable, "-m", "iopfd",
                               "run", "--metrics-address", "off"], pass_fds=[listener.fileno()],
                              env=env, stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(path, timeout=10) as client:
                    assert client.status()["queues"] == []
                break
            except ProtocolError:
                raise
            except OSError:
                assert time.monotonic() < deadline and daemon.poll() is None, \
                    daemon.stderr.read() if daemon.poll() else ""
                time.sleep(0.1)
        assert not os.path.exists(tmp_path / "never-bound.sock")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert os.path.exists(path)  # systemd's socket file: iopfd does not remove what it did not create


def _request_as(uid: int, path: str, message: dict) -> dict:
    """``message`` sent from a child process running as ``uid``; its reply."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # no imports after fork: the child only needs a socket
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(10)
                sock.connect(path)
                sock.send(protocol.encode(message))
                os.write(writer, sock.recv(65536))
        finally:
            os._exit(0)
    os.close(writer)
    try:
        return protocol.decode(os.read(reader, 65536))
    finally:
        os.close(reader)
        os.waitpid(child, 0)


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root (CI runs as root)")
@pytest.mark.asyncio
async def test_only_the_owner_or_an_administrator_detaches_a_queue():
    public = tempfile.mkdtemp(prefix="iopfd-control-")  # reachable by the other uid
    os.chmod(public, 0o755)
    try:
        server, path, task = await start_server(Path(public), allowed_uids=[0, 65534, 65533])
        os.chmod(path, 0o666)
        for name, owner in (("vm1", 65534), ("vm2", None)):
            server.queues.add(name, EmulatedFaultQueue().open(), owner_uid=owner)

        def detach(uid: int, queue: str) -> dict:
            return _request_as(uid, path, {"v": protocol.VERSION, "op": "detach", "id": 1, "queue": queue})

        refused = await asyncio.to_thread(detach, 65533, "vm1")
        assert refused["error"]["code"] == "not-owner" and "attached by uid 65534" in refused["error"]["message"]
        refused = await asyncio.to_thread(detach, 65534, "vm2")
        assert refused["error"]["code"] == "not-owner" and "from iopfd's config" in refused["error"]["message"]
        assert (await asyncio.to_thread(detach, 65534, "vm1"))["ok"]  # its owner
        assert (await call(path, "detach", "vm2"))["queue"] == "vm2"  # root
        assert len(server.queues) == 0 and server.engine.queues == {}
        server.request_stop()
        assert await task == 0
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.asyncio
async def test_attach_beyond_max_queues_is_refused_naming_the_limit(daemon):
    server, path = await daemon(control={"max_queues": 2})
    server.queues.add("cfg1", EmulatedFaultQueue().open())
    server.queues.add("cfg2", EmulatedFaultQueue().open())
    with pytest.raises(ProtocolError) as refused:
        await call(path, "broker", "vm1")
    assert refused.value.code == "too-many-queues" and "max_queues" in refused.value.message


@pytest.mark.skipif(os.path.exists("/dev/iommu"), reason="needs a host without /dev/iommu (every CI host)")
@pytest.mark.asyncio
async def test_broker_without_dev_iommu_is_refused_naming_the_fix_and_the_daemon_serves_on(daemon):
    _, path = await daemon()
    with pytest.raises(ProtocolError) as refused:
        await call(path, "broker", "vm1")
    assert refused.value.code == "broker-failed"
    assert "/dev/iommu" in refused.value.message and "CONFIG_IOMMUFD" in refused.value.message
    assert (await call(path, "status"))["queues"] == []
