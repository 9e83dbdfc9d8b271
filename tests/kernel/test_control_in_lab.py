"""The control socket in the lab: a VMM-side peer (this test process) hands fault fds to ``iopfd run``
or has iopfd broker one, and the kernel confirms every group answered."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy
import pytest

from iopfd import protocol
from iopfd.client import INVALID, LAST_PAGE, SUCCESS, Client, ForwardChannel
from iopfd.iommufd import Iommufd
from iopfd.iommufd.selftest import FaultingMockSetup
from iopfd.protocol import ProtocolError
from iopfd_dev.daemon import DaemonProcess, spawn_daemon
from test_daemon import assert_kernel_has_nothing_pending, trigger

# An exec'd daemon's start takes 5-15 s in the TCG guest and several times that on a busy host (its
# wait is 180 s). The sidecars are forked (iopfd_dev.forked: the same `iopfd run`, without its start-up
# imports); the VMM's exec with --forward-fd is exec'd.
pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]


@pytest.fixture
def sidecar(tmp_path):
    """``iopfd run`` with no queue of its own, waiting for peers on a control socket."""
    started = []

    def start(config: str = "", path: str | None = None) -> tuple[DaemonProcess, str]:
        path = path or str(tmp_path / "control.sock")
        (tmp_path / "iopfd.toml").write_text(textwrap.dedent(config))
        process = spawn_daemon(tmp_path, (), "--config", str(tmp_path / "iopfd.toml"), "--metrics-address", "off",
                               env={"IOPFD_CONTROL__PATH": path}, forked=True)
        started.append(process)
        return process, path

    yield start
    for process in started:
        process.close()


def wait_answered(client: Client, groups: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        totals = client.status()["totals"]
        if sum(totals[k] for k in ("success", "invalid", "deadline", "shed", "error")) >= groups:
            return totals
        time.sleep(0.05)
    raise AssertionError(f"not answered in {timeout} s: {client.status()}")


def test_attach_serves_a_fault_fd_handed_over_the_socket(sidecar, rig, queue):
    iopfd, path = sidecar()
    with Client(path) as client:
        attached = client.attach(queue.fd, "vm1", labels={"vm": "guest1"}, devices={rig.device.dev_id: "mock0"})
        assert attached["queue"] == "vm1"
        trigger(rig, 1000)
        totals = wait_answered(client, 1000)
        (status,) = client.status()["queues"]
        assert status["labels"] == {"vm": "guest1"} and status["pending"] == 0
        reply = client.detach("vm1")
    assert totals["success"] == 1000 and reply["outcomes"]["success"] == 1000
    assert_kernel_has_nothing_pending(queue, 1000)
    assert iopfd.terminate() == 0


def test_broker_opens_the_queue_and_the_peer_builds_its_hwpt_in_the_iommufd_it_received(sidecar):
    iopfd, path = sidecar()
    with Client(path) as client:
        iommufd_fd, fault_id = client.broker("vm2", labels={"vm": "guest2"})
        with Iommufd(iommufd_fd) as ctx, FaultingMockSetup(ctx, fault_id) as rig:
            trigger(rig, 300)
            totals = wait_answered(client, 300)
            assert client.status()["queues"][0]["pending"] == 0
            reply = client.detach("vm2")
    assert totals["success"] == 300 and reply["faults"] == 300
    assert iopfd.terminate() == 0


def test_forward_round_trip_through_a_peer(sidecar, rig, queue):
    iopfd, path = sidecar("""
        [policies.vmm]
        type = "forward"
    """)
    seen = []

    def decide(records):
        seen.append(records.copy())
        last = records[(records["flags"] & LAST_PAGE) != 0]
        return numpy.where(last["addr"] % 0x2000 == 0, SUCCESS, INVALID)

    with Client(path) as control, Client(path, timeout=120) as peer:
        channel = peer.forward("vmm", read_records=100)
        answering = threading.Thread(target=channel.serve, args=(decide,), kwargs={"count": 100})
        answering.start()
        control.attach(queue.fd, "vm3", policy="vmm")
        trigger(rig, 100)
        answering.join(120)
        totals = wait_answered(control, 100)
        control.detach("vm3")
        channel.close()
    assert (totals["success"], totals["invalid"]) == (50, 50)
    records = numpy.concatenate(seen)
    assert len(records) == 100 and set(records["dev_id"].tolist()) == {rig.device.dev_id}
    assert len(set(records["cookie"].tolist())) == 100 and all(len(packet) <= 100 for packet in seen)
    assert_kernel_has_nothing_pending(queue, 100)
    assert iopfd.terminate() == 0


def test_a_forward_peer_killed_mid_stream_leaves_no_group_unanswered(sidecar, rig, queue):
    """The peer answers 50 groups, then stops answering and is killed with SIGKILL while holding the
    rest: those get the policy's when_disconnected answer (invalid), and so do later groups."""
    iopfd, path = sidecar("""
        [defaults]
        response_deadline = 60
        [policies.vmm]
        type = "forward"
    """)
    ready, events_seen = os.pipe()
    child = os.fork()
    if child == 0:  # the VMM-side peer
        try:
            with Client(path, timeout=120) as peer:
                channel = peer.forward("vmm", read_records=1)  # a packet per group
                os.write(events_seen, b"c")
                count = 0
                while (records := channel.recv()) is not None:
                    count += 1
                    if count <= 50:
                        channel.respond(channel.group_ids(records), SUCCESS)
                    if count == 80:
                        os.write(events_seen, b"k")  # holding 30 unanswered: kill me now
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"c"
        with Client(path) as control:
            control.attach(queue.fd, "vm4", policy="vmm")
            trigger(rig, 100)
            assert os.read(ready, 1) == b"k"
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            totals = wait_answered(control, 100)
            trigger(rig, 10, start=100)  # no peer now: answered when_disconnected at once
            totals = wait_answered(control, 110)
            control.detach("vm4")
    finally:
        os.close(ready)
        os.close(events_seen)
    assert (totals["success"], totals["invalid"], totals["deadline"]) == (50, 60, 0)
    assert_kernel_has_nothing_pending(queue, 110)
    assert iopfd.terminate() == 0


def test_a_peer_with_an_unauthorised_uid_is_refused_and_logged(sidecar, tmp_path):
    public = tempfile.mkdtemp(prefix="iopfd-control-")  # pytest's tmp_path is 0700: nobody could reach it
    os.chmod(public, 0o755)
    iopfd, path = sidecar("""
        [control]
        mode = 0o666
    """, path=os.path.join(public, "control.sock"))
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # no imports after fork: the child only needs a socket
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(30)
                sock.connect(path)
                sock.send(protocol.encode({"op": "status", "id": 1}))
                os.write(writer, sock.recv(4096))
        except BaseException as exc:
            os.write(writer, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    raw = os.read(reader, 4096)
    os.close(reader)
    shutil.rmtree(public, ignore_errors=True)
    reply = json.loads(raw) if raw.startswith(b"{") else pytest.fail(f"the uid 65534 peer failed: {raw!r}")
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert iopfd.terminate() == 0
    refused = [e for e in iopfd.log_events() if e["event"].startswith("control peer refused")]
    assert refused and refused[0]["peer_uid"] == 65534


def test_a_pipe_or_a_plain_file_is_refused_as_a_fault_fd(sidecar, tmp_path):
    iopfd, path = sidecar()
    read_end, write_end = os.pipe()
    plain = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR)
    with Client(path) as client:
        for fd, what in ((read_end, "pipe:["), (plain, str(tmp_path / "plain"))):
            with pytest.raises(ProtocolError) as refused:
                client.attach(fd, "bad")
            assert refused.value.code == "not-a-fault-fd" and what in refused.value.message
        assert client.status()["queues"] == []
    for fd in (read_end, write_end, plain):
        os.close(fd)
    assert iopfd.terminate() == 0


@pytest.mark.parametrize(("mode", "forward"), [("attach", False), ("broker", False),
                                               ("attach", True)])
def test_the_example_vmm_peer_runs(sidecar, mode, forward):
    iopfd, path = sidecar("""
        [policies.vmm]
        type = "forward"
    """)
    result = subprocess.run([sys.executable, "examples/vmm_peer.py", "--socket", path, "--mode", mode,
                             "--faults", "50", *(["--forward", "vmm"] if forward else [])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{mode}: 50 faults, iopfd answered 50" in result.stdout
    if forward:  # the example's peer: SUCCESS below 64 KiB (0x1000 .. 0xf000), INVALID above
        assert "forward: the peer answered 50 groups" in result.stdout
        assert "'success': 15" in result.stdout and "'invalid': 35" in result.stdout
    assert iopfd.terminate() == 0


def test_forward_fd_at_exec_makes_an_inherited_socketpair_the_peer_channel(tmp_path, rig, queue):
    """The VMM's way without a control socket: --fault-fd and --forward-fd at exec."""
    (tmp_path / "iopfd.toml").write_text(textwrap.dedent("""
        [control]
        path = "off"
        [policies.vmm]
        type = "forward"
        [[queues]]
        name = "vm5"
        policy = "vmm"
    """))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    iopfd = spawn_daemon(tmp_path, (queue.fd, theirs.fileno()), "--config", str(tmp_path / "iopfd.toml"),
                         "--fault-fd", f"{queue.fd}:vm5", "--forward-fd", f"{theirs.fileno()}:vmm:64",
                         "--metrics-address", "off")
    theirs.close()
    try:
        trigger(rig, 300)
        packets = []

        def decide(records):
            packets.append(len(records))
            return SUCCESS

        with ForwardChannel(ours, read_records=64) as channel:
            assert channel.serve(decide, count=300) == 300
            iopfd.wait_answered(300)
            assert iopfd.terminate() == 0
        assert iopfd.totals()["success"] == 300 and max(packets) <= 64
        assert_kernel_has_nothing_pending(queue, 300)
    finally:
        iopfd.close()
