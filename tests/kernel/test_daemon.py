"""``iopfd run`` in the lab: a separate process serving a fault fd it inherited, checked by the kernel.

The test keeps its own reference to the fault fd (the same open file the daemon inherited, as a VMM
would). Once the daemon is done, a response from the test to any cookie the daemon was given must
be refused: the kernel says that group is no longer pending.
"""

from __future__ import annotations

import select
import textwrap
import threading
import urllib.request

import pytest

from iopfd.iommufd import PERM_READ, PERM_WRITE, SUCCESS
from iopfd_dev.daemon import DaemonProcess, open_cookies, spawn_daemon

# An exec'd daemon's start takes 5-15 s in the TCG guest and several times that on a busy host (its
# wait is 180 s). The tests fork theirs (iopfd_dev.forked: the same `iopfd run`, without its start-up
# imports), except where the exec is part of what is tested.
pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]


def trigger(rig, count: int, *, start: int = 0, addr_base: int = 0x100000) -> None:
    for i in range(start, start + count):
        rig.device.trigger_iopf(addr=addr_base + i * 0x1000, grpid=i % 512, perm=PERM_READ)


def assert_kernel_has_nothing_pending(queue, cookies: int) -> None:
    """No group undelivered, and no cookie in 1..cookies pending (cookies are lowest-free, so every
    cookie the daemon was handed out lies in that range)."""
    with select.epoll() as ep:
        ep.register(queue.fd, select.EPOLLIN)
        assert ep.poll(0) == [], "the kernel still has undelivered groups"
    left = open_cookies(queue, cookies)
    assert left == [], f"cookies still pending in the kernel: {left[:10]}"


@pytest.fixture
def daemon(tmp_path, queue):
    started = []

    def start(*args: str, env: dict[str, str] | None = None, forked: bool = True) -> DaemonProcess:
        env = {"IOPFD_CONTROL__PATH": str(tmp_path / "control.sock"), **(env or {})}
        process = spawn_daemon(tmp_path, (queue.fd,), "--fault-fd", f"{queue.fd}:lab", *args, env=env, forked=forked)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def test_10000_faults_are_all_answered(daemon, rig, queue):
    iopfd = daemon("--metrics-address", "127.0.0.1:9769")
    trigger(rig, 10_000)
    iopfd.wait_answered(10_000)
    metrics = urllib.request.urlopen("http://127.0.0.1:9769/metrics", timeout=10).read().decode()
    assert 'iopfd_fault_groups_total{outcome="success",queue="lab"} 10000.0' in metrics
    assert 'iopfd_faults_total{queue="lab"} 10000.0' in metrics
    assert 'iopfd_response_latency_seconds_count{queue="lab"} 10000.0' in metrics
    assert iopfd.terminate() == 0
    assert iopfd.totals()["success"] == 10_000
    assert_kernel_has_nothing_pending(queue, 10_000)


def test_sigterm_mid_stream_exits_0_with_nothing_left_open(daemon, rig, queue):
    iopfd = daemon()
    stop = threading.Event()
    triggered = 0

    def stream():
        nonlocal triggered
        while not stop.is_set():
            trigger(rig, 50, start=triggered)
            triggered += 50

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        iopfd.wait_answered(500)
        assert iopfd.terminate() == 0  # while faults keep coming
    finally:
        stop.set()
        thread.join()
    iopfd.wait_message(lambda m: m == "STOPPING=1", timeout=5)
    answered = iopfd.totals()["success"]
    assert answered >= 500
    assert_kernel_has_nothing_pending_read(queue, triggered, answered)


def assert_kernel_has_nothing_pending_read(queue, triggered: int, answered: int) -> None:
    """Every group the daemon read is answered; the rest are still queued, unread, for the next reader."""
    left = open_cookies(queue, triggered)
    assert left == [], f"groups read but left unanswered: cookies {left[:10]}"
    left = 0
    while groups := queue.read():
        left += len(groups)
        queue.respond([(group.cookie, SUCCESS) for group in groups])
    assert answered + left == triggered


def test_reject_policy_answers_invalid(daemon, rig, queue):
    iopfd = daemon("--policy", "reject")
    trigger(rig, 100)
    iopfd.wait_answered(100)
    assert iopfd.terminate() == 0
    totals = iopfd.totals()
    assert (totals["invalid"], totals["success"]) == (100, 0)
    assert_kernel_has_nothing_pending(queue, 100)


def test_rules_policy_routes_by_device_and_address(daemon, rig, queue, tmp_path):
    config = tmp_path / "iopfd.toml"
    config.write_text(textwrap.dedent(f"""
        policy = "guest"
        [policies.guest]
        type = "rules"
        default = "reject"
        [[policies.guest.rules]]
        dev_id = [{rig.device.dev_id}]
        address = [0x100000, 0x132000]
        perm = ["read", "write"]
        queue = ["lab"]
        policy = "accept"
    """))
    iopfd = daemon("--config", str(config))
    trigger(rig, 100)  # 0x100000 + i * 0x1000: the first 50 inside the range
    rig.device.trigger_iopf(addr=0x101000, perm=PERM_READ | PERM_WRITE)  # inside, allowed perms
    iopfd.wait_answered(101)
    assert iopfd.terminate() == 0
    totals = iopfd.totals()
    assert (totals["success"], totals["invalid"]) == (51, 50)
    assert_kernel_has_nothing_pending(queue, 101)


# A raising or garbage policy answers at once: its deadline is long, so a slow guest cannot turn its
# error into a deadline answer. The hanging one's short deadline is what is checked.
@pytest.mark.parametrize(("plugin", "outcome", "deadline"), [("lab-raise", "error", 30), ("lab-garbage", "error", 30),
                                                             ("lab-hang", "deadline", 0.2)])
def test_a_raising_garbage_or_hanging_policy_costs_only_an_invalid_answer(daemon, rig, queue, tmp_path, plugin_path,
                                                                          plugin, outcome, deadline):
    config = tmp_path / "iopfd.toml"
    config.write_text(f'policy = "broken"\n[defaults]\nresponse_deadline = {deadline}\n'
                      f'[policies.broken]\ntype = "{plugin}"\n')
    iopfd = daemon("--config", str(config), env={"PYTHONPATH": plugin_path, "IOPFD_LOG_LEVEL": "debug"})
    trigger(rig, 20)
    iopfd.wait_answered(20)
    trigger(rig, 5, start=20)  # still serving
    iopfd.wait_answered(25)
    assert iopfd.terminate() == 0
    totals = iopfd.totals()
    assert (totals[outcome], totals["success"]) == (25, 0)
    assert_kernel_has_nothing_pending(queue, 25)
    if outcome == "deadline":
        latencies = [e["latency"] for e in iopfd.log_events() if e["event"] == "group answered"]
        assert max(latencies) == pytest.approx(0.2, abs=0.15), latencies


def test_ready_status_and_stopping_reach_the_notify_socket(daemon, rig, queue):
    iopfd = daemon(env={"IOPFD_LOG_LEVEL": "debug"}, forked=False)  # the real start: exec, imports, READY=1
    assert next(m for m in iopfd.messages if not m.startswith("FDSTORE=")) == "READY=1"
    trigger(rig, 3)
    status = iopfd.wait_message(lambda m: m.startswith("STATUS=") and "3 groups answered" in m)
    assert "3 success" in status and "0 pending" in status
    assert iopfd.terminate() == 0
    iopfd.wait_message(lambda m: m == "STOPPING=1", timeout=5)
    answered = [e for e in iopfd.log_events() if e["event"] == "group answered"]
    assert [e["outcome"] for e in answered] == ["success"] * 3  # per-group lines at debug level
