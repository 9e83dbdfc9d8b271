"""sd_notify and watchdog support, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest
from structlog.testing import capture_logs

from iopfd.service.systemd import Notifier, run_watchdog, watchdog_interval


@pytest.fixture
def receiver(tmp_path):
    """A bound notify socket and its NOTIFY_SOCKET path."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


def test_sends_exact_messages(receiver):
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    notifier.status("serving 2 queues")
    notifier.watchdog()
    notifier.stopping()
    notifier.send("MAINPID=42", ERRNO=5)
    notifier.status("line one\nline two")
    assert [sock.recv(4096) for _ in range(6)] == [
        b"READY=1", b"STATUS=serving 2 queues", b"WATCHDOG=1", b"STOPPING=1", b"MAINPID=42\nERRNO=5",
        b"STATUS=line one line two",
    ]
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready()


def test_abstract_socket():
    name = f"iopfd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(1)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_noop_without_notify_socket(environ):
    notifier = Notifier.from_environment(environ)
    assert not notifier.enabled
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.status("x")
        notifier.close()
    assert logs == []


def test_vanished_socket_warns_once_per_outage(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    sock.close()
    os.unlink(path)
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.status("still here")
    assert [(e["event"], e["log_level"]) for e in logs] == [("cannot notify systemd", "warning")]

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, capture_logs() as logs:
        sock.bind(path)
        assert notifier.watchdog()  # recovered: a later outage is reported again
        sock.close()
        os.unlink(path)
        assert not notifier.watchdog()
    assert [e["event"] for e in logs] == ["cannot notify systemd"]
    notifier.close()


def test_full_receiver_queue_does_not_block_or_raise(receiver):
    _, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        results = [notifier.watchdog() for _ in range(5000)]  # nobody reads: the queue fills (EAGAIN)
    assert not all(results)
    assert len(logs) == 1
    notifier.close()


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())}, 0.0005),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
])
def test_watchdog_interval(environ, expected):
    with capture_logs() as logs:
        assert watchdog_interval(environ) == expected
    assert logs == []


@pytest.mark.parametrize("environ", [
    {"WATCHDOG_USEC": "soon"},
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "-5"},
    {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
])
def test_watchdog_interval_garbage(environ):
    with capture_logs() as logs:
        assert watchdog_interval(environ) is None
    assert [(e["event"], e["log_level"]) for e in logs] == \
        [("ignoring an invalid WATCHDOG_USEC or WATCHDOG_PID", "warning")]


async def _run_for(notifier: Notifier, healthy, seconds: float, block: float = 0) -> None:
    task = asyncio.create_task(run_watchdog(notifier, 0.02, healthy))
    await asyncio.sleep(0)  # let the watchdog start its first sleep
    time.sleep(block)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_run_watchdog_pings_when_healthy(receiver):
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    await _run_for(notifier, lambda: True, 0.3)
    messages = drain(sock)
    assert len(messages) >= 2
    assert set(messages) == {b"WATCHDOG=1"}
    notifier.close()


@pytest.mark.asyncio
async def test_run_watchdog_skips_when_unhealthy(receiver):
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        await _run_for(notifier, lambda: False, 0.2)
    assert drain(sock) == []
    assert logs and all(e["event"] == "watchdog ping skipped" and e["reason"] == "unhealthy" for e in logs)
    notifier.close()


@pytest.mark.asyncio
async def test_run_watchdog_treats_failing_health_check_as_unhealthy(receiver):
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})

    def broken() -> bool:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        await _run_for(notifier, broken, 0.1)
    assert drain(sock) == []
    assert "watchdog health check raised" in {e["event"] for e in logs}
    notifier.close()


@pytest.mark.asyncio
async def test_run_watchdog_skips_after_loop_stall(receiver):
    _, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        await _run_for(notifier, lambda: True, 0.01, block=0.1)
    assert logs and logs[0]["reason"] == "event loop stalled"  # the tick that overran: no ping
    notifier.close()
