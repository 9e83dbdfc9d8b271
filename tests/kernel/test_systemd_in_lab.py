"""iopfd.service and iopfd.socket as shipped, under a real systemd: PID 1 of the lab's systemd boot.

The units are what the wheel's ``iopfd install-units`` writes (the shipped files, ExecStart naming the
wheel's iopfd, installed on Debian's Python as docs/operations.md does), copied into the runtime unit
directory /run/systemd/system: the guest's root is the host's, read-only. A drop-in gives the service
what the lab needs and nothing else: the config's path, the lab's plug-in policies on PYTHONPATH, a
response deadline long enough to catch groups pending, and start/stop timeouts for a slow TCG guest.
The config is the shipped host example with the lab's plug-in policies added. A VMM-side peer (this
test process) attaches a mock device's fault queue over the control socket; the kernel says at the end
whether any group is left unanswered.

The tests share one iopfd where they can (a start costs tens of seconds under TCG) and run in file
order: the stop comes last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from iopfd.client import Client
from iopfd.iommufd import FaultQueue
from iopfd.iommufd.selftest import FaultingMockSetup
from test_daemon import assert_kernel_has_nothing_pending, trigger

pytestmark = [pytest.mark.kernel, pytest.mark.systemd_guest, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
LAB = Path("/run/iopfd-lab")
RUNTIME_UNITS = Path("/run/systemd/system")
SERVICE, SOCKET = "iopfd.service", "iopfd.socket"
CONTROL = "/run/iopfd/control.sock"  # iopfd.socket's ListenSequentialPacket=
# Seconds a start (or restart) of iopfd may take: 10-60 s in the TCG guest, minutes on a loaded host.
# Only an upper bound: every wait below ends as soon as its condition holds.
START = 600.0
HOST_CONFIG = "etc/iopfd/iopfd.toml"  # what install-units writes from config/iopfd-host.toml


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, argv))} exited with {result.returncode}:\n" \
                                       f"{result.stdout}{result.stderr}"
    return result


def show(unit: str, *properties: str) -> dict[str, str]:
    out = run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def fail(what: str):
    state = show(SERVICE, "ActiveState", "SubState", "Result", "NRestarts")
    logged = run("journalctl", f"--unit={SERVICE}", "--lines=60", "--output=cat", "--no-pager", check=False).stdout
    pytest.fail(f"{what}; {SERVICE}: {state}; its journal:\n{logged}")


def wait_for(what: str, probe, timeout: float = START):
    """``probe()``'s first true value, asked every 0.2 s; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)
    return value


def journal_cursor() -> str:
    out = run("journalctl", "--lines=0", "--show-cursor", "--quiet").stdout
    return out.strip().removeprefix("-- cursor: ")


def journal(after: str) -> list[str]:
    """The messages of iopfd.service (systemd's about it, and iopfd's own) logged after cursor ``after``."""
    return run("journalctl", f"--after-cursor={after}", f"--unit={SERVICE}", "--output=cat", "--no-pager").stdout \
        .splitlines()


def iopfd_events(lines: list[str], event: str) -> list[dict]:
    """iopfd's JSON log lines (log_format auto under journald) whose event starts with ``event``."""
    return [entry for line in lines if line.startswith("{") and (entry := json.loads(line))["event"].startswith(event)]


def pending(peer: Client) -> int:
    return peer.status()["totals"]["pending"]


def answered(peer: Client) -> dict[str, int]:
    totals = peer.status()["totals"]
    return {k: v for k, v in totals.items() if k in ("success", "invalid", "deadline", "shed", "error")}


def running() -> bool:
    return show(SERVICE, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}


def restarted(main_pid: str, restarts: int) -> bool:
    """iopfd runs again, started anew once since ``main_pid``, and is ready (READY=1: active)."""
    now = show(SERVICE, "MainPID", "NRestarts")
    return now["MainPID"] not in ("0", main_pid) and now["NRestarts"] == str(restarts + 1) and running()


def fault_fds_of_pid1() -> int:
    """Fault fds systemd holds: the fd store of iopfd.service (no other service has fault fds here)."""
    held = 0
    for fd in os.listdir("/proc/1/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            held += os.readlink(f"/proc/1/fd/{fd}") == "anon_inode:[iommufd-pgfault]"
    return held


@pytest.fixture(scope="module")
def installed(request, plugin_path):
    """The shipped units installed by the wheel's iopfd in /run/systemd/system, with the lab's drop-in,
    the lab config and plug-ins in place, and iopfd.socket listening."""
    if Path("/proc/1/comm").read_text().strip() != "systemd":
        pytest.fail("systemd is not PID 1 here: these tests run in the lab's systemd boot "
                    "(uv run pytest tests/kernel/test_systemd_in_lab.py)")
    packed = request.config.getoption("--lab-venv")
    assert packed, "no --lab-venv: the lab bridge (tests/conftest.py) installs iopfd's wheel for the systemd boot"
    # Where the unit's sandbox lets iopfd see it (ProtectHome= hides the host's cache, where the bridge
    # packed it), and on tmpfs: every start of iopfd reads its modules again.
    (LAB / "venv").mkdir(parents=True)
    run("tar", "-xf", packed, "-C", LAB / "venv")
    iopfd = LAB / "venv" / "bin" / "iopfd"
    staged = LAB / "root"
    result = run(iopfd, "install-units", "--root", staged)
    assert "cannot reach" not in result.stderr, result.stderr  # the unit's sandbox lets it see this iopfd
    shipped = (REPO / "systemd" / SERVICE).read_text()
    service = (staged / "etc/systemd/system" / SERVICE).read_text()
    assert service == shipped.replace("ExecStart=/usr/local/bin/iopfd ", f"ExecStart={iopfd} ")
    for unit in (SERVICE, SOCKET):
        shutil.copy(staged / "etc/systemd/system" / unit, RUNTIME_UNITS / unit)
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", service, re.M)
    dropin = RUNTIME_UNITS / f"{SERVICE}.d" / "lab.conf"
    dropin.parent.mkdir(exist_ok=True)
    dropin.write_text(
        f"[Service]\nExecStart=\nExecStart={exec_start.replace('/etc/iopfd/', f'{LAB}/')}\n"
        f"Environment=PYTHONPATH={LAB / 'plugins'} IOPFD_DEFAULTS__RESPONSE_DEADLINE=60\n"
        # Under TCG on a busy host a start (imports, pyroute2) can take minutes, past the default 90 s.
        f"TimeoutStartSec={START:.0f}s\nTimeoutStopSec={START:.0f}s\n")
    shutil.copytree(plugin_path, LAB / "plugins")  # where the service sees them: PrivateTmp= hides /tmp
    write_config()
    run("systemctl", "daemon-reload")
    assert show(SERVICE, "FragmentPath", "DropInPaths") == {"FragmentPath": str(RUNTIME_UNITS / SERVICE),
                                                             "DropInPaths": str(dropin)}
    # Nothing of this can reach the host: the root the guest shares with it is read-only here.
    with pytest.raises(OSError, match="Read-only file system"):
        Path("/etc/systemd/system/iopfd-lab-probe").write_text("")
    run("systemctl", "start", SOCKET)
    yield
    run("systemctl", "stop", SOCKET, SERVICE, check=False)
    for path in (RUNTIME_UNITS / SERVICE, RUNTIME_UNITS / SOCKET, RUNTIME_UNITS / f"{SERVICE}.d", LAB):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run("systemctl", "daemon-reload", check=False)


def write_config(**replace: tuple[str, str]) -> None:
    """The shipped host config (as install-units wrote it) with the lab's plug-in policies; each
    ``(old, new)`` of ``replace`` (named as the caller likes) applied."""
    text = (LAB / "root" / HOST_CONFIG).read_text()
    for old, new in replace.values():
        assert old in text, f"the host config has no {old!r} any more; update this test"
        text = text.replace(old, new)
    text += '\n# The lab\'s plug-in policies (tests/kernel/conftest.py)\n[policies.hang]\ntype = "lab-hang"\n\n' \
            '[policies.stall]\ntype = "lab-stall"\n'
    (LAB / "iopfd.toml").write_text(text)


@pytest.fixture
def service(installed, rig, queue):
    """The units as ``installed`` left them, iopfd started or not. At the end, before the test's mock
    device and queue go: iopfd lets go of every queue it serves (detach) and systemd of every fault fd in
    its fd store (the kernel refuses to destroy a fault queue whose fd is open), or, if iopfd is not
    running, systemd's failure state is reset."""
    yield
    if running():
        with peer() as vmm:
            for served in vmm.status()["queues"]:
                vmm.detach(served["name"])
    else:
        run("systemctl", "stop", SERVICE)
        run("systemctl", "reset-failed", SERVICE, SOCKET, check=False)
        run("systemctl", "start", SOCKET)
    wait_for("systemd's fd store emptied", lambda: fault_fds_of_pid1() == 0, timeout=60)


def peer() -> Client:
    """A VMM-side peer on the control socket, once the iopfd its connection started is ready."""
    client = Client(CONTROL, timeout=START)  # connected to iopfd.socket's backlog, until iopfd accepts

    def ready() -> bool:
        state = show(SERVICE, "ActiveState", "SubState")
        if state["ActiveState"] == "failed" or state["SubState"] == "auto-restart":
            client.close()
            fail("iopfd failed to start")
        return running()

    wait_for("iopfd started by a peer's connection", ready)
    return client


def test_a_peer_on_the_socket_starts_iopfd_which_answers_its_faults_and_reports_counts_in_status_text(service, rig,
                                                                                                     queue):
    assert show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert show(SOCKET, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "listening"}
    with peer() as vmm:
        assert vmm.attach(queue.fd, "vm1")["queue"] == "vm1"
        wait_for("the fault fd in systemd's fd store", lambda: fault_fds_of_pid1() == 1, timeout=60)
        trigger(rig, 100)  # inside the host config's guest-memory window: SUCCESS
        wait_for("100 groups answered", lambda: answered(vmm)["success"] == 100)
    status = wait_for("STATUS= with the answers", lambda: (text := show(SERVICE, "StatusText")["StatusText"])
                      .startswith("1 queue(s), 100 groups") and text)
    assert status == "1 queue(s), 100 groups answered (100 success, 0 invalid, 0 deadline, 0 shed, 0 error), 0 pending"
    assert_kernel_has_nothing_pending(queue, 100)
    # ... from inside the unit's sandbox (systemd.config gives the lab kernel what it takes)
    pid = show(SERVICE, "MainPID")["MainPID"]
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert (fields["NoNewPrivs"], fields["Seccomp"], fields["CapEff"], fields["CapBnd"]) == \
           ("1", "2", "0000000000000000", "0000000000000000")
    for namespace in ("mnt", "uts"):  # ProtectSystem= and friends; ProtectHostname=
        assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(f"/proc/1/ns/{namespace}")
    assert Path(f"/proc/{pid}/cgroup").read_text() == "0::/system.slice/iopfd.service\n"


def test_sigkill_restarts_iopfd_which_takes_its_queue_back_from_the_fd_store_and_answers_the_orphans(service, rig,
                                                                                                    queue):
    with peer() as vmm:
        vmm.attach(queue.fd, "vm1", policy="hang")
        trigger(rig, 50)
        wait_for("50 groups read and pending", lambda: pending(vmm) == 50)
    before = show(SERVICE, "MainPID", "NRestarts")
    cursor = journal_cursor()
    os.kill(int(before["MainPID"]), signal.SIGKILL)
    wait_for("iopfd restarted by systemd", lambda: restarted(before["MainPID"], int(before["NRestarts"])))
    (taken,) = iopfd_events(journal(cursor), "fault queue taken back from the fd store")
    assert (taken["queue"], taken["answered_invalid"]) == ("vm1", 50)
    assert_kernel_has_nothing_pending(queue, 50)
    with peer() as vmm:
        (served,) = vmm.status()["queues"]
        assert (served["name"], served["policy"], served["pending"]) == ("vm1", "hang", 0)


def test_a_loop_stalled_past_watchdogsec_is_killed_and_restarted_and_nothing_is_left_open(service, rig, queue):
    with peer() as vmm:
        vmm.attach(queue.fd, "vm1", policy="stall")
    before = show(SERVICE, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "10s"  # the shipped WatchdogSec=
    cursor = journal_cursor()
    trigger(rig, 1)  # the policy blocks the event loop for an hour on it: no more watchdog pings
    wait_for("iopfd restarted by systemd", lambda: restarted(before["MainPID"], int(before["NRestarts"])))
    logged = journal(cursor)
    assert f"{SERVICE}: Watchdog timeout (limit 10s)!" in logged, logged
    (taken,) = iopfd_events(logged, "fault queue taken back from the fd store")
    assert (taken["queue"], taken["answered_invalid"]) == ("vm1", 1)
    assert_kernel_has_nothing_pending(queue, 1)


def test_reload_applies_the_configs_policies_and_keeps_every_queue_and_group(service, ctx, rig, queue):
    outside = 0x100_0000_0000  # just past the host config's guest-memory window: INVALID, until the reload
    with FaultQueue.alloc(ctx) as waiting_queue, FaultingMockSetup(ctx, waiting_queue.id) as waiting_rig, \
            peer() as vmm:
        vmm.attach(queue.fd, "vm1")  # the config's default policy, guest-memory
        vmm.attach(waiting_queue.fd, "vm2", policy="hang")
        trigger(waiting_rig, 5)
        trigger(rig, 10, addr_base=outside)
        wait_for("vm1 answered, vm2 pending", lambda: answered(vmm)["invalid"] == 10 and pending(vmm) == 5)
        before = show(SERVICE, "MainPID", "NRestarts")
        cursor = journal_cursor()
        write_config(window=("address = [0x0, 0x100_0000_0000]", "address = [0x0, 0x200_0000_0000]"))
        run("systemctl", "reload", SERVICE)
        wait_for("the reload applied", lambda: iopfd_events(journal(cursor), "configuration reloaded"))
        assert show(SERVICE, "MainPID", "NRestarts") == before
        queues = {q["name"]: q for q in vmm.status()["queues"]}
        assert (queues["vm1"]["policy"], queues["vm2"]["policy"], queues["vm2"]["pending"]) == \
               ("guest-memory", "hang", 5)
        trigger(rig, 10, addr_base=outside)  # the same pages: now inside the window
        wait_for("vm1's new faults answered", lambda: answered(vmm)["success"] == 10)
        assert pending(vmm) == 5
        assert vmm.detach("vm2")["outcomes"]["deadline"] == 5  # what it held through the reload, answered now
        wait_for("vm2's fd out of the fd store", lambda: fault_fds_of_pid1() == 1, timeout=60)
        assert_kernel_has_nothing_pending(waiting_queue, 5)
        write_config()
        run("systemctl", "reload", SERVICE)  # the lab config again, for the tests after this one
    assert_kernel_has_nothing_pending(queue, 20)


def test_stop_answers_every_group_read_exits_0_and_the_socket_still_listens(service, rig, queue):
    with peer() as vmm:
        vmm.attach(queue.fd, "vm1", policy="hang")
        trigger(rig, 20)
        wait_for("20 groups read and pending", lambda: pending(vmm) == 20)
    run("systemctl", "stop", SERVICE)
    assert show(SERVICE, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus") == {
        "ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}  # CLD_EXITED, 0
    assert_kernel_has_nothing_pending(queue, 20)
    assert show(SOCKET, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "listening"}
    assert stat.S_ISSOCK(os.stat(CONTROL).st_mode)
    wait_for("the fd store emptied by the stop", lambda: fault_fds_of_pid1() == 0, timeout=60)


def test_systemd_analyze_security_of_the_booted_unit_is_what_docs_operations_md_says(installed):
    result = run("systemd-analyze", "security", "--no-pager", SERVICE)
    score = re.search(r"Overall exposure level for iopfd\.service: (\d+\.\d) (\w+)", result.stdout)
    assert score, result.stdout
    stated = re.search(r"on the booted lab\s+guest.*?\*\*(\d+\.\d) \((\w+)\)\*\*", (REPO / "docs" / "operations.md")
                       .read_text(), re.S)
    assert stated and stated.groups() == score.groups(), \
        f"the booted unit scores {score.groups()}; docs/operations.md says {stated and stated.groups()}"
