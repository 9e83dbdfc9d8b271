"""The daemon around the engine: queues from config and --fault-fd, exit codes, signals, notify, metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iopfd.engine import Engine, Policy, QueueConfig, QueueResponder
from iopfd.iommufd import INVALID, SUCCESS
from iopfd.policies import Policies
from iopfd.service.arguments import FaultFdArg, UsageError
from iopfd.service.config import ConfigError, load_settings
from iopfd.service.metrics import MetricsEndpoint, registry_for
from iopfd.service.prepare import prepare, resolve_queues
from iopfd.service.server import Server
from iopfd.service.systemd import Notifier
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest


def iopfd(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iopfd", *args], capture_output=True, text=True, timeout=60,
                          **kwargs)


def test_fault_fd_argument():
    assert FaultFdArg.parse("7") == FaultFdArg(7)
    assert FaultFdArg.parse("7:vm1") == FaultFdArg(7, "vm1")
    with pytest.raises(ValueError, match="expected N or N:NAME"):
        FaultFdArg.parse("x:vm1")


def test_fault_fds_fill_config_queues_by_name_and_add_the_rest(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[queues]]\nname = "vm1"\npolicy = "reject"\nmax_pending = 8\n')
    queues = resolve_queues(load_settings(config), [FaultFdArg(5, "vm1"), FaultFdArg(6)])
    assert [(q.name, q.fd, q.policy, q.max_pending) for q in queues] == [("vm1", 5, "reject", 8),
                                                                        ("fd6", 6, "accept", None)]


def test_a_queue_without_fd_or_no_queue_at_all_is_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[queues]]\nname = "vm1"\n')
    with pytest.raises(ConfigError,
                       match=r"queues\.0\.fd: queue 'vm1' has no fault fd; set fd or pass --fault-fd N:vm1"):
        resolve_queues(load_settings(config), [])
    with pytest.raises(UsageError, match="no fault queue to serve"):
        resolve_queues(load_settings(None, control={"path": "off"}), [])
    assert resolve_queues(load_settings(None), []) == []  # queues may arrive over the control socket
    with pytest.raises(UsageError, match="fd 5 is given to more than one queue"):
        resolve_queues(load_settings(None), [FaultFdArg(5, "a"), FaultFdArg(5, "b")])


@pytest.mark.parametrize("kind", ["pipe", "file", "closed"])
def test_prepare_refuses_anything_but_a_fault_fd(tmp_path, kind):
    if kind == "pipe":
        fd, other = os.pipe()
    elif kind == "file":
        fd, other = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR), None
    else:
        fd, other = 999, None
    try:
        with pytest.raises(UsageError, match=f"queue 'fd{fd}': adopt fd {fd}.*not an iommufd fault fd"):
            prepare(load_settings(None, control={"path": "off"}), [FaultFdArg(fd)])
    finally:
        for descriptor in (fd, other):
            if descriptor is not None and kind != "closed":
                os.close(descriptor)


def test_iopfd_run_on_a_pipe_exits_2_with_the_reason():
    read_end, write_end = os.pipe()
    try:
        result = iopfd("run", "--fault-fd", f"{read_end}:vm1", "--metrics-address", "off", pass_fds=(read_end,))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 2
    assert f"queue 'vm1': adopt fd {read_end} failed" in result.stderr
    assert "it is pipe:[" in result.stderr and "not an iommufd fault fd" in result.stderr


def test_iopfd_run_with_a_bad_config_exits_78_naming_the_field(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[defaults]\nmax_pending = 0\n[policies.r]\ntype = "rules"\ndefault = "nope"\n')
    result = iopfd("run", "--config", str(config), "--fault-fd", "0")
    assert result.returncode == 78
    assert "defaults.max_pending:" in result.stderr
    fixed = {**os.environ, "IOPFD_DEFAULTS__MAX_PENDING": "5"}
    result = iopfd("run", "--config", str(config), "--fault-fd", "0", env=fixed)
    assert result.returncode == 78 and "policies.r.default: unknown policy 'nope'" in result.stderr
    result = iopfd("run", "--config", str(config), "--fault-fd", "0", env={**fixed, "IOPFD_POLICY": "x"})
    assert result.returncode == 78 and "policy: unknown policy 'x'" in result.stderr
    assert "(from IOPFD_POLICY)" in result.stderr and str(config) not in result.stderr


def test_check_config_validates_policies_too(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('policy = "r"\n[policies.r]\ntype = "rules"\n[[policies.r.rules]]\naddress = [16, 8]\n'
                      'policy = "missing"\n')
    result = iopfd("check-config", str(config))
    assert result.returncode == 78
    assert "policies.r.rules.0: Value error, address range [0x10, 0x8) is empty" in result.stderr
    config.write_text('policy = "r"\n[policies.r]\ntype = "rules"\n[[policies.r.rules]]\npolicy = "missing"\n')
    result = iopfd("check-config", str(config))
    assert result.returncode == 78
    assert "policies.r.rules.0.policy: unknown policy 'missing'" in result.stderr
    config.write_text('policy = "p"\n[policies.p]\ntype = "not-installed"\n')
    result = iopfd("check-config", str(config))
    assert result.returncode == 78 and "policies.p.type: unknown policy type 'not-installed'" in result.stderr
    result = iopfd("check-config", "config/iopfd.toml")
    assert result.returncode == 0 and "ok" in result.stdout


class Hang(Policy):
    name = "hang"

    async def decide(self, group):
        await asyncio.sleep(3600)


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock, str(tmp_path / "notify")
    sock.close()


@pytest.mark.asyncio
async def test_serve_notifies_and_sigterm_answers_everything_then_returns_0(notify_socket, monkeypatch, tmp_path):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    sock, path = notify_socket
    emulated = EmulatedFaultQueue()
    engine = Engine()
    engine.add(QueueResponder(emulated.open(), Hang(), QueueConfig("vm1", response_deadline=30)))
    settings = load_settings(None, metrics_address="off", shutdown_grace=0.05, control={"path": "off"},
                             runtime_dir=str(tmp_path))
    server = Server(settings, engine, Policies({}), Notifier.from_environment({"NOTIFY_SOCKET": path}))
    serving = asyncio.create_task(server.serve())
    assert await asyncio.to_thread(sock.recv, 100) == b"READY=1"
    for i in range(5):
        emulated.report(PageRequest(dev_id=1, addr=i))
    status = await asyncio.to_thread(sock.recv, 500)
    assert status.startswith(b"STATUS=1 queue(s), ")
    while emulated.undelivered:
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 10) == 0
    messages = []
    while b"STOPPING=1" not in messages:
        messages.append(await asyncio.to_thread(sock.recv, 500))
    assert [code for _, code in emulated.answers] == [INVALID] * 5  # the deadline code, at shutdown
    assert emulated.pending_cookies == []
    emulated.close()


@pytest.mark.asyncio
async def test_metrics_endpoint_reports_the_engine():
    emulated = EmulatedFaultQueue()
    engine = Engine()

    class Mixed(Policy):
        async def decide(self, group):
            return SUCCESS if group.dev_id == 1 else INVALID

    engine.add(QueueResponder(emulated.open(), Mixed(), QueueConfig("vm1")))
    engine.start()
    for dev_id in (1, 1, 2):
        emulated.report(PageRequest(dev_id=dev_id, addr=0x1000))
    while sum(engine.totals()[k] for k in ("success", "invalid")) < 3:
        await asyncio.sleep(0.01)
    metrics = MetricsEndpoint(registry_for(engine), "127.0.0.1", 0)
    try:
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics").read().decode())
    finally:
        metrics.close()
        await engine.stop(0)
        emulated.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("iopfd_fault_groups_total", (("outcome", "success"), ("queue", "vm1")))] == 2
    assert samples[("iopfd_fault_groups_total", (("outcome", "invalid"), ("queue", "vm1")))] == 1
    assert samples[("iopfd_faults_total", (("queue", "vm1"),))] == 3
    assert samples[("iopfd_response_latency_seconds_count", (("queue", "vm1"),))] == 3
    assert samples[("iopfd_response_latency_seconds_bucket", (("le", "5.0"), ("queue", "vm1")))] == 3
    assert samples[("iopfd_pending_groups", (("queue", "vm1"),))] == 0
    assert samples[("iopfd_read_batch_groups_sum", ())] == 3
    assert samples[("iopfd_response_write_errors_total", (("queue", "vm1"),))] == 0
    assert ("iopfd_build_info", (("python", sys.version.split()[0]), ("version", "0.1.0"))) in samples


@pytest.mark.asyncio
async def test_serve_pings_the_watchdog_while_queues_are_served(notify_socket, monkeypatch, tmp_path):
    sock, path = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    emulated = EmulatedFaultQueue()
    engine = Engine()
    engine.add(QueueResponder(emulated.open(), Hang(), QueueConfig("vm1")))
    server = Server(load_settings(None, metrics_address="off", control={"path": "off"}, runtime_dir=str(tmp_path)),
                    engine, Policies({}),
                    Notifier.from_environment({"NOTIFY_SOCKET": path}))
    serving = asyncio.create_task(server.serve())
    messages = [await asyncio.to_thread(sock.recv, 500) for _ in range(4)]
    assert messages[0] == b"READY=1" and b"WATCHDOG=1" in messages
    engine.queues["vm1"].failure = "test: the fd went bad"  # an unserved queue: no more pings
    await asyncio.sleep(0.2)
    sock.setblocking(False)
    while True:
        try:
            sock.recv(500)
        except BlockingIOError:
            break
    await asyncio.sleep(0.3)
    late = []
    while True:
        try:
            late.append(sock.recv(500))
        except BlockingIOError:
            break
    assert b"WATCHDOG=1" not in late
    server.request_stop()
    assert await serving == 0
    emulated.close()
