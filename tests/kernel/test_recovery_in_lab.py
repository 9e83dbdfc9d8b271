"""Crash recovery in the lab: iopfd killed with SIGKILL while it holds read-but-unanswered groups,
restarted on the fault fd it had put in the fd store (this test plays systemd), answers them."""

from __future__ import annotations

import json
import signal

import pytest

from iopfd.iommufd.fault import DEFAULT_BATCH_RECORDS
from iopfd_dev.daemon import spawn_daemon
from test_daemon import assert_kernel_has_nothing_pending, trigger

# Both lives are forked (iopfd_dev.forked: the same `iopfd run` without its start-up imports, which
# take 5-15 s in the TCG guest).
pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(600)]


def test_kill_9_mid_stream_then_restart_on_the_stored_fd(tmp_path, rig, queue, plugin_path):
    runtime = tmp_path / "run"
    common = {"IOPFD_RUNTIME_DIR": str(runtime), "IOPFD_CONTROL__PATH": "off", "IOPFD_METRICS_ADDRESS": "off"}
    (tmp_path / "life1").mkdir()
    first = spawn_daemon(tmp_path / "life1", (queue.fd,), "--fault-fd", f"{queue.fd}:lab", "--policy", "stuck",
                         env={**common, "PYTHONPATH": plugin_path, "IOPFD_POLICIES__STUCK__TYPE": "lab-hang",
                              "IOPFD_DEFAULTS__RESPONSE_DEADLINE": "60"}, forked=True)
    try:
        stored = first.wait_message(lambda m: "FDSTORE=1" in m.splitlines())
        assert "FDNAME=queue-lab" in stored.splitlines() and "queue-lab" in first.stored_fds
        trigger(rig, 200)
        first.wait_message(lambda m: "200 pending" in m)  # read, and waiting for the hanging policy
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        assert json.loads((runtime / "state.json").read_text())["lab"]["cookie_mark"] == 256
        trigger(rig, 100, start=200)  # arrive while iopfd is down: queued, unread

        (tmp_path / "life2").mkdir()
        stored_fd = first.stored_fds["queue-lab"]
        second = spawn_daemon(tmp_path / "life2", (stored_fd,), env={**common, "LISTEN_FDS": "1",
                                                                    "LISTEN_FDNAMES": "queue-lab"},
                              systemd_fd=stored_fd, forked=True)
        try:
            second.wait_answered(100)
            assert second.terminate() == 0
            (taken,) = [e for e in second.log_events() if e["event"].startswith("fault queue taken back")]
            # the mark, and one read beyond it (a life may die between a read and its mark)
            assert taken["answered_invalid"] == 200 and taken["swept_cookies"] == 256 + DEFAULT_BATCH_RECORDS
            assert second.totals()["success"] == 100
        finally:
            second.close()
    finally:
        first.close()
    assert_kernel_has_nothing_pending(queue, 300)
