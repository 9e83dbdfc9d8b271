"""Fault injection in the lab, each run checked by the kernel afterwards: no cookie left open.

The daemon is killed (SIGTERM, SIGKILL) at random moments of a 50 000-group stream raised by the C
trigger, its loop is blocked by a policy, and the device's HWPT is replaced under groups it holds.
Runs are seeded, so a failing run can be replayed by its index. The daemons are forked from this
process (iopfd_dev.forked: the same ``iopfd run`` without its start-up imports, which cost seconds
each in the guest).
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from iopfd.engine.queue import MAX_PENDING
from iopfd_dev.bench.run import finish_trigger, start_trigger
from iopfd_dev.daemon import spawn_daemon
from test_daemon import assert_kernel_has_nothing_pending, assert_kernel_has_nothing_pending_read, trigger

pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]  # up to two daemon starts each

# The stream lasts about 1 s, and every kill lands inside it. (The check afterwards costs a write()
# per cookie of 1..STREAM that is not open, about 50 µs each in the guest.)
STREAM = 20_000
STREAM_RATE = 20_000  # groups/s
RUNS = 20
QUIET = {"IOPFD_CONTROL__PATH": "off", "IOPFD_METRICS_ADDRESS": "off", "IOPFD_WATCH_DEVICES": "false"}


def _wait_delivered(queue, timeout: float = 120) -> None:
    """Until the daemon has read everything the kernel queued (the test's own fd polls empty)."""
    import select

    deadline = time.monotonic() + timeout
    while select.select([queue.fd], [], [], 0)[0]:
        assert time.monotonic() < deadline, "the daemon stopped reading"
        time.sleep(0.05)


@pytest.mark.parametrize("run", range(RUNS))
def test_sigterm_at_a_random_moment_of_a_stream(run, tmp_path, ctx, queue, rig, bench_tools):
    iopfd = spawn_daemon(tmp_path, (queue.fd,), "--fault-fd", f"{queue.fd}:lab", env=QUIET, forked=True)
    try:
        stream = start_trigger(bench_tools, ctx, rig, STREAM, STREAM_RATE)
        time.sleep(random.Random(run).uniform(0, STREAM / STREAM_RATE))
        status = iopfd.terminate()
        finish_trigger(stream)
        assert status == 0, iopfd.output()
        answered = iopfd.totals()["success"]
    finally:
        iopfd.close()
    # Every group read was answered; the rest are still queued, unread, for the next reader.
    assert_kernel_has_nothing_pending_read(queue, STREAM, answered)


@pytest.mark.parametrize("run", range(RUNS))
def test_kill_9_at_a_random_moment_then_restart_from_the_fd_store(run, tmp_path, ctx, queue, rig, bench_tools):
    """Nothing is left open after the restart's sweep, and no group is answered twice: the kernel
    takes one response per pending cookie, and the sweep runs before the new life reads anything,
    so no cookie can be reissued between the old life's answer and the sweep. The new life's own
    responses are never refused (write_errors 0): it never answers a group someone else answered."""
    env = QUIET | {"IOPFD_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "life1").mkdir()
    first = spawn_daemon(tmp_path / "life1", (queue.fd,), "--fault-fd", f"{queue.fd}:lab", env=env, forked=True)
    second = None
    try:
        first.wait_message(lambda m: "FDSTORE=1" in m.splitlines())
        stream = start_trigger(bench_tools, ctx, rig, STREAM, STREAM_RATE)
        time.sleep(random.Random(run).uniform(0, STREAM / STREAM_RATE))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        stored_fd = first.stored_fds["queue-lab"]
        (tmp_path / "life2").mkdir()
        second = spawn_daemon(tmp_path / "life2", (stored_fd,),
                              env=env | {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "queue-lab"},
                              systemd_fd=stored_fd, forked=True)
        finish_trigger(stream)
        _wait_delivered(queue)
        second.messages.clear()  # only a STATUS= sent from now on proves nothing is pending
        second.wait_message(lambda m: m.startswith("STATUS=") and m.endswith(" 0 pending"), timeout=60)
        assert second.terminate() == 0, second.output()
        events = second.log_events()
        (taken,) = [e for e in events if e["event"].startswith("fault queue taken back")]
        ready_at = next(i for i, e in enumerate(events) if e["event"] == "ready")
        assert events.index(taken) < ready_at  # swept before the first read
        assert taken["answered_invalid"] <= MAX_PENDING  # at most max_pending groups were read and held
        assert second.totals()["error"] == 0
        assert [e for e in events if "refused" in e["event"]] == []
    finally:
        first.close()
        if second is not None:
            second.close()
    assert_kernel_has_nothing_pending(queue, STREAM)


def test_a_policy_blocking_the_loop_for_2_s_costs_watchdog_pings_not_groups(tmp_path, queue, rig, plugin_path):
    """With WatchdogSec=1 (a ping due every 0.5 s) the daemon sends no ping for the stretch its loop
    was blocked, so systemd would restart it; the groups are all answered once the loop runs again.
    (Their deadline is longer than the block: the groups read with the blocking one are decided after it.)"""
    config = tmp_path / "iopfd.toml"
    config.write_text('policy = "blocking"\n[defaults]\nresponse_deadline = 30\n'
                      '[policies.blocking]\ntype = "lab-block"\n')
    iopfd = spawn_daemon(tmp_path, (queue.fd,), "--fault-fd", f"{queue.fd}:lab", "--config", str(config),
                         env=QUIET | {"PYTHONPATH": plugin_path, "WATCHDOG_USEC": "1000000"}, forked=True)
    try:
        iopfd.wait_message(lambda m: m == "WATCHDOG=1")
        trigger(rig, 100)
        iopfd.wait_answered(100, timeout=60)
        iopfd.messages.clear()
        iopfd.wait_message(lambda m: m == "WATCHDOG=1")  # pinging again once the loop runs
        assert iopfd.terminate() == 0
        (skipped,) = [e for e in iopfd.log_events() if e["event"] == "watchdog ping skipped"]
        assert skipped["reason"] == "event loop stalled" and skipped["overrun_s"] >= 1.4
        assert iopfd.totals()["success"] == 100
    finally:
        iopfd.close()
    assert_kernel_has_nothing_pending(queue, 100)


def test_a_replaced_hwpt_under_pending_groups_costs_refused_responses_and_nothing_else(tmp_path, queue, rig,
                                                                                       plugin_path):
    """The device is moved off the fault-capable HWPT while the daemon holds 50 groups: the kernel
    answers them INVALID itself. The daemon's answers (at its deadline) are refused, counted and
    logged, and it goes on serving once the device is back."""
    config = tmp_path / "iopfd.toml"
    # A deadline well past the 1 s STATUS interval: every held group is still pending at the replace.
    config.write_text('policy = "stuck"\n[defaults]\nresponse_deadline = 5.0\n'
                      '[policies.stuck]\ntype = "lab-hang"\n')
    iopfd = spawn_daemon(tmp_path, (queue.fd,), "--fault-fd", f"{queue.fd}:lab", "--config", str(config),
                         env=QUIET | {"PYTHONPATH": plugin_path}, forked=True)
    try:
        trigger(rig, 50)
        iopfd.wait_message(lambda m: m.endswith(" 50 pending"))
        rig.device.replace(rig.parent.id)  # off the nested HWPT: the kernel answers its pending groups
        iopfd.wait_answered(50, timeout=30)  # at the deadline; the kernel refuses every one
        rig.device.replace(rig.nested.id)
        trigger(rig, 10, start=50)
        iopfd.wait_answered(60, timeout=30)
        assert iopfd.terminate() == 0
        events = iopfd.log_events()
        assert len([e for e in events if e["event"].startswith("kernel refused a response")]) == 50
        assert iopfd.totals()["deadline"] == 60
    finally:
        iopfd.close()
    assert_kernel_has_nothing_pending(queue, 60)

