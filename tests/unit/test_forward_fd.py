"""``iopfd run --forward-fd N:POLICY[:RECORDS]`` (and --forward-events-fd): an inherited socketpair end
becomes a forward policy's peer channel; anything else is refused before serving, exit 2."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from iopfd.service.arguments import ForwardEventsFdArg, ForwardFdArg, UsageError
from iopfd.service.config import load_settings
from iopfd.service.prepare import prepare
from iopfd.service.systemd import Notifier

POLICIES = {"vmm": {"type": "forward"}, "other": {"type": "forward"}}


def settings(tmp_path):
    return load_settings(None, metrics_address="off", control={"path": str(tmp_path / "control.sock")},
                         policies=POLICIES)


def test_the_argument_syntax():
    assert ForwardFdArg.parse("5:vmm") == ForwardFdArg(5, "vmm", 256)
    assert ForwardFdArg.parse("5:vmm:100") == ForwardFdArg(5, "vmm", 100)
    assert ForwardEventsFdArg.parse("6:vmm") == ForwardEventsFdArg(6, "vmm")
    for bad in ("5", "x:vmm", "5:", "5:vmm:0", "5:vmm:4097", "5:vmm:ten", "5:vmm:1:2"):
        with pytest.raises(ValueError, match=r"5:vmm|N:POLICY|RECORDS"):
            ForwardFdArg.parse(bad)
    with pytest.raises(ValueError, match="M:POLICY"):
        ForwardEventsFdArg.parse("6")


def test_a_bad_argument_exits_2_through_argparse():
    result = subprocess.run([sys.executable, "-m", "iopfd", "run", "--forward-fd", "5:vmm:0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "RECORDS is how many fault records" in result.stderr
    assert "Traceback" not in result.stderr


def test_iopfd_run_with_a_pipe_as_forward_fd_exits_2_with_the_reason(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[control]\npath = "{tmp_path / "c.sock"}"\n[policies.vmm]\ntype = "forward"\n')
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run([sys.executable, "-m", "iopfd", "run", "--config", str(config), "--metrics-address",
                                 "off", "--forward-fd", f"{read_end}:vmm"], pass_fds=(read_end,), capture_output=True,
                                text=True, timeout=60)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 2, result.stderr
    assert f"--forward-fd {read_end}:vmm: fd {read_end} is not a socket" in result.stderr
    assert "socketpair(AF_UNIX, SOCK_SEQPACKET)" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("arguments", "says"), [
    (lambda s: [ForwardFdArg(s, "nope")], "unknown policy 'nope'"),
    (lambda s: [ForwardFdArg(s, "accept")], "policy 'accept' is not of type forward"),
    (lambda s: [ForwardFdArg(s, "vmm"), ForwardFdArg(s, "other")], "that fd is given twice"),
    (lambda s: [ForwardFdArg(s, "vmm"), ForwardFdArg(s + 1, "vmm")], "policy 'vmm' already forwards to fd"),
])
def test_prepare_refuses_bad_forward_fds(tmp_path, arguments, says):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(UsageError, match=says):
            prepare(settings(tmp_path), [], forward_fds=arguments(theirs.fileno()))
        os.fstat(theirs.fileno())  # still the caller's
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_prepare_refuses_a_socket_of_another_kind(tmp_path, kind):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if kind == "stream" else socket.SOCK_DGRAM)
    try:
        with pytest.raises(UsageError, match=f"is a AF_UNIX SOCK_{kind.upper()} socket, not AF_UNIX SOCK_SEQPACKET"):
            prepare(settings(tmp_path), [], forward_fds=[ForwardFdArg(a.fileno(), "vmm")])
        os.fstat(a.fileno())  # refused, but not closed: it is still the caller's
    finally:
        a.close()
        b.close()


def test_an_events_fd_needs_a_forward_fd_for_its_policy(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(UsageError, match="no --forward-fd N:vmm to go with it"):
            prepare(settings(tmp_path), [], forward_events_fds=[ForwardEventsFdArg(a.fileno(), "vmm")])
    finally:
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_an_inherited_socketpair_is_the_policys_channel_until_either_end_closes(tmp_path):
    channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    (ours, theirs), (events_ours, events_theirs), (other_ours, other_theirs) = channels
    server = prepare(settings(tmp_path), [], forward_fds=[ForwardFdArg(theirs.detach(), "vmm", 64),
                                                          ForwardFdArg(other_theirs.detach(), "other")],
                     forward_events_fds=[ForwardEventsFdArg(events_theirs.detach(), "vmm")])
    server.notifier = Notifier(None)
    serving = asyncio.create_task(server.serve())
    vmm, other = server.policies.get("vmm"), server.policies.get("other")
    async with asyncio.timeout(10):
        while vmm.channel is None or other.channel is None:
            await asyncio.sleep(0.001)
    assert (vmm.channel.read_records, vmm.event_channel is not None, other.channel.read_records) == (64, True, 256)
    assert server.configured_policies() == {"vmm": vmm, "other": other}
    other_ours.close()  # the peer closes its end: the policy has no peer any more
    async with asyncio.timeout(10):
        while other.channel is not None:
            await asyncio.sleep(0.001)
    assert len(server.channels) == 1
    server.request_stop()
    assert await asyncio.wait_for(serving, 10) == 0
    ours.settimeout(5)
    events_ours.settimeout(5)
    assert ours.recv(64) == b"" and events_ours.recv(64) == b""  # iopfd closed its ends at exit
    assert vmm.channel is None and not server.channels
    ours.close()
    events_ours.close()
