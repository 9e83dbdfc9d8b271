"""What a host operator runs into (issue 14's findings): status with no queue, signals with a dead
stderr reader, the metrics address, SIGHUP, argument checks, journald priorities, the control
commands, background task failures and configuration errors."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import structlog

from iopfd.cli import build_parser
from iopfd.engine import Engine
from iopfd.engine.queue import MAX_PENDING
from iopfd.engine.stats import OUTCOMES
from iopfd.iommufd import INVALID, SUCCESS
from iopfd.iommufd.probe import probe
from iopfd.policies import Policies
from iopfd.policies.registry import unchanged
from iopfd.service.config import ConfigError, load_settings
from iopfd.service.logging import configure_logging
from iopfd.service.server import Server
from iopfd.service.systemd import Notifier
from iopfd_dev.cli import build_parser as build_dev_parser
from iopfd_dev.daemon import spawn_daemon
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest
from server_in_loop import servers_in_loop

ROOT = Path(__file__).resolve().parents[2]


def iopfd(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iopfd", *args], capture_output=True, text=True, timeout=60,
                          **kwargs)


@pytest.fixture(autouse=True)
def _no_iopfd_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("IOPFD_") or name in ("JOURNAL_STREAM", "RUNTIME_DIRECTORY"):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()


@pytest.fixture
def notify(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    yield sock, str(tmp_path / "notify")
    sock.close()


async def receive_until(sock: socket.socket, predicate, timeout: float = 10) -> list[bytes]:
    """Notify messages up to the first for which ``predicate`` holds."""
    sock.settimeout(timeout)
    messages = []
    while not messages or not predicate(messages[-1]):
        messages.append(await asyncio.to_thread(sock.recv, 1000))
    return messages


def quiet_settings(tmp_path, **overrides):
    return load_settings(None, **{"metrics_address": "off", "control": {"path": "off"}, "watch_devices": False,
                                  "runtime_dir": str(tmp_path), **overrides})


# -- 1. STATUS= while no queue is served --------------------------------------------------------
def test_engine_totals_name_every_outcome_with_no_queue():
    totals = Engine().totals()
    assert {outcome: totals[outcome] for outcome in OUTCOMES} == dict.fromkeys(OUTCOMES, 0)
    assert totals["pending"] == 0 and totals["faults"] == 0


@pytest.mark.asyncio
async def test_status_is_sent_with_no_queue_and_follows_queues_attached_later(notify, tmp_path):
    sock, path = notify
    server = Server(quiet_settings(tmp_path), Engine(), Policies({}), Notifier(path))
    serving = asyncio.create_task(server.serve())
    messages = await receive_until(sock, lambda m: m.startswith(b"STATUS="))
    assert messages[-1] == (b"STATUS=0 queue(s), 0 groups answered (0 success, 0 invalid, 0 deadline, 0 shed, "
                            b"0 error), 0 pending")
    emulated = EmulatedFaultQueue()
    server.queues.add("vm1", emulated.open())
    for i in range(3):
        emulated.report(PageRequest(dev_id=1, addr=0x1000 * i))
    await receive_until(sock, lambda m: m.startswith(b"STATUS=1 queue(s), 3 groups answered (3 success"))
    server.request_stop()
    assert await asyncio.wait_for(serving, 10) == 0
    emulated.close()


@pytest.mark.asyncio
async def test_the_status_op_totals_name_every_outcome(tmp_path):
    from iopfd.client import Client

    async with servers_in_loop(tmp_path) as start:
        _, path = await start()
        status = await asyncio.to_thread(lambda: Client(path, timeout=10).status())
    assert {outcome: status["totals"][outcome] for outcome in OUTCOMES} == dict.fromkeys(OUTCOMES, 0)


# -- 2. SIGTERM when nobody reads stderr any more -------------------------------------------------
BROKEN_STDERR_DAEMON = textwrap.dedent("""
    import asyncio, json, sys
    from iopfd.engine import Engine, Policy, QueueConfig, QueueResponder
    from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest
    from iopfd.policies import Policies
    from iopfd.service.config import load_settings
    from iopfd.service.logging import configure_logging
    from iopfd.service.server import Server
    from iopfd.service.systemd import Notifier

    class Hang(Policy):
        name = "hang"

        async def decide(self, group):
            await asyncio.sleep(3600)

    async def main():
        configure_logging("info", "json")
        emulated = EmulatedFaultQueue()
        engine = Engine()
        engine.add(QueueResponder(emulated.open(), Hang(), QueueConfig("vm1", response_deadline=60)))
        settings = load_settings(None, metrics_address="off", control={"path": "off"}, watch_devices=False,
                                 shutdown_grace=0.05)
        server = Server(settings, engine, Policies({}), Notifier(None))
        serving = asyncio.create_task(server.serve())
        for i in range(5):
            emulated.report(PageRequest(dev_id=1, addr=i))
        while emulated.undelivered or engine.queues["vm1"].deciding < 5:
            await asyncio.sleep(0.01)
        print("serving", flush=True)
        code = await serving
        with open(sys.argv[1], "w") as out:
            json.dump({"code": code, "answers": [answer for _, answer in emulated.answers],
                       "pending": emulated.pending_cookies}, out)
        return code

    sys.exit(asyncio.run(main()))
""")


def test_sigterm_stops_cleanly_when_the_stderr_reader_is_gone(tmp_path):
    result = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, "-c", BROKEN_STDERR_DAEMON, str(result)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline() == b"serving\n", proc.stderr.read().decode()
        proc.stderr.close()  # the log collector went away: every log line now meets EPIPE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    outcome = json.loads(result.read_text())
    assert outcome == {"code": 0, "answers": [INVALID] * 5, "pending": []}


class ReaderGone(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_log_line_that_cannot_be_written_is_dropped_not_raised():
    configure_logging("info", "json", stream=ReaderGone())
    structlog.get_logger("iopfd.test").info("nobody reads this")
    closed = io.StringIO()
    closed.close()
    configure_logging("info", "json", stream=closed)
    structlog.get_logger("iopfd.test").error("nor this")  # ValueError: I/O operation on closed file


# -- 3. the metrics address in use or unresolvable ----------------------------------------------
@pytest.mark.parametrize("case", ["in-use", "unresolvable", "not-local"])
def test_a_metrics_address_that_cannot_be_listened_on_is_a_config_error(tmp_path, case):
    control = tmp_path / "control.sock"
    config = tmp_path / "c.toml"
    config.write_text(f'[control]\npath = "{control}"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address, expected = {
            "in-use": (f"127.0.0.1:{taken.getsockname()[1]}",
                       f"metrics_address: 127.0.0.1:{taken.getsockname()[1]} is already in use (another iopfd?); "
                       "choose a free port, or off"),
            "unresolvable": ("no-such-host.invalid:9769", "metrics_address: cannot resolve 'no-such-host.invalid'"),
            "not-local": ("192.0.2.1:9769", "metrics_address: 192.0.2.1 is not an address of this host"),
        }[case]
        done = iopfd("run", "--config", str(config), "--metrics-address", address)
    assert done.returncode == 78, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not control.exists()  # the control socket was closed and its file removed


# -- 4. SIGHUP ------------------------------------------------------------------------------------
def write_config(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


@pytest.mark.asyncio
async def test_reload_applies_policies_and_defaults_and_keeps_every_queue(tmp_path):
    config = tmp_path / "c.toml"
    write_config(config, """
        policy = "p"
        [defaults]
        response_deadline = 1.0
        [policies.p]
        type = "reject"
        [policies.kept]
        type = "rules"
        default = "accept"
    """)
    settings = load_settings(config, metrics_address="off", control={"path": "off"}, watch_devices=False,
                             runtime_dir=str(tmp_path))
    server = Server(settings, Engine(), Policies.build_all(settings.policy_tables, settings.policy), Notifier(None),
                    reload_settings=lambda: load_settings(config, metrics_address="off"))
    emulated = EmulatedFaultQueue()
    queue = server.queues.add("vm1", emulated.open()).queue  # no policy of its own: the default, p
    pinned = server.queues.add("vm2", EmulatedFaultQueue().open(), policy="kept").queue
    kept_policy = pinned.policy
    serving = asyncio.create_task(server.serve())

    async def answer_one() -> int:
        count = len(emulated.answers)
        emulated.report(PageRequest(dev_id=1, addr=0x1000))
        while len(emulated.answers) == count:
            await asyncio.sleep(0.005)
        return emulated.answers[-1][1]

    assert await answer_one() == INVALID
    write_config(config, """
        policy = "p"
        [defaults]
        response_deadline = 5.0
        max_pending = 16
        [policies.p]
        type = "accept"
        [policies.kept]
        type = "rules"
        default = "accept"
    """)
    assert server.reload()
    assert await answer_one() == SUCCESS
    assert (queue.config.response_deadline, queue.config.max_pending) == (5.0, 16)
    assert pinned.policy is kept_policy  # its table did not change: the running instance stays
    write_config(config, "policy = \n")  # broken: the running configuration stays
    assert not server.reload()
    assert await answer_one() == SUCCESS and queue.config.response_deadline == 5.0
    assert sorted(server.engine.queues) == ["vm1", "vm2"]
    server.request_stop()
    assert await asyncio.wait_for(serving, 10) == 0
    assert emulated.pending_cookies == []
    emulated.close()


def test_a_reload_keeps_only_policies_whose_tables_and_references_are_unchanged(tmp_path):
    def settings(a_type: str):
        config = tmp_path / f"{a_type}.toml"
        write_config(config, f"""
            [policies.a]
            type = "{a_type}"
            [policies.uses-a]
            type = "rules"
            default = "a"
            [policies.alone]
            type = "rules"
            default = "accept"
        """)
        return load_settings(config)

    assert unchanged(settings("reject").policy_tables, settings("reject").policy_tables) == {"a", "uses-a", "alone"}
    assert unchanged(settings("reject").policy_tables, settings("accept").policy_tables) == {"alone"}


def test_a_config_queue_gets_its_own_limits(tmp_path):
    config = tmp_path / "c.toml"
    write_config(config, """
        [[queues]]
        name = "vm1"
        max_pending = 8
        response_deadline = 0.5
    """)
    server = Server(load_settings(config, runtime_dir=str(tmp_path)), Engine(), Policies({}), Notifier(None))
    queue = server.queues.add("vm1", EmulatedFaultQueue().open(), policy="accept").queue
    assert (queue.max_pending, queue.config.response_deadline) == (8, 0.5)
    other = server.queues.add("vm2", EmulatedFaultQueue().open()).queue
    assert (other.max_pending, other.config.response_deadline) == (MAX_PENDING, 1.0)  # accept's default


def test_sighup_reloads_the_running_daemon_and_sigterm_still_stops_it(tmp_path):
    config = tmp_path / "c.toml"
    write_config(config, f"""
        metrics_address = "off"
        watch_devices = false
        runtime_dir = "{tmp_path}"
        policy = "p"
        [control]
        path = "{tmp_path / 'control.sock'}"
        [policies.p]
        type = "reject"
    """)
    daemon = spawn_daemon(tmp_path, (), "--config", str(config))
    try:
        config.write_text(config.read_text().replace('type = "reject"', 'type = "accept"'))
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "configuration reloaded" not in daemon.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.proc.poll() is None, daemon.output()
        assert "configuration reloaded" in daemon.output()
        assert daemon.terminate() == 0
        assert not (tmp_path / "control.sock").exists()
    finally:
        daemon.close()


def test_the_service_reloads_with_sighup():
    service = (ROOT / "systemd" / "iopfd.service").read_text()
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in service


# -- 5. values checked when parsed ----------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["run", "--fault-fd", "3:bad/name"], "the queue name must be 1 to 64 of A-Z a-z 0-9 _ . -"),
    (["run", "--fault-fd", "3:" + "a" * 65], "the queue name must be 1 to 64"),
    (["run", "--fault-fd", "99999999999999999999"], "expected N or N:NAME"),
    (["run", "--fault-fd", "-1"], "expected N or N:NAME"),
    (["detach", "no/such"], "a queue name is 1 to 64"),
    (["status", "--timeout", "-3"], "a number above 0"),
])
def test_bad_values_exit_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--duration", "-1"], "a number above 0"),
    (["demo", "--duration", "nan"], "a number above 0"),
    (["bench", "--groups", "-5"], "a whole number of at least 1"),
    (["bench", "--policies", "accept,fast"], "policies are accept, reject"),
    (["lab", "run", "--timeout", "inf", "true"], "a number above 0"),
])
def test_bad_tooling_values_exit_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        build_dev_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_fault_fd_name_is_an_argparse_error_not_a_traceback():
    done = iopfd("run", "--fault-fd", "3:bad/name")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --fault-fd: '3:bad/name': the queue name must be" in done.stderr


# -- 6. the units: the socket outlives the service, and non-root VMMs can reach it ----------------
def unit_values(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


def test_the_socket_is_not_in_a_directory_the_service_removes():
    service, socket_unit = ROOT / "systemd" / "iopfd.service", ROOT / "systemd" / "iopfd.socket"
    (listen,) = unit_values(socket_unit, "ListenSequentialPacket")
    removed = [Path("/run") / name for value in unit_values(service, "RuntimeDirectory") for name in value.split()]
    assert removed and unit_values(service, "RuntimeDirectoryPreserve") != ["yes"]
    for directory in removed:  # the innermost directory of each goes at a stop
        assert directory not in Path(listen).parents, (listen, directory)
    (mode,) = unit_values(socket_unit, "DirectoryMode")
    assert int(mode, 8) & 0o001, "others must be able to search the socket's directory (SocketGroup= guards it)"
    assert int(unit_values(socket_unit, "SocketMode")[0], 8) & 0o060 == 0o060  # the group reads and writes


def test_the_state_goes_where_systemd_made_the_runtime_directory(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/iopfd/state")
    assert load_settings(None).runtime_dir == "/run/iopfd/state"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert load_settings(None).runtime_dir == "/run/iopfd"


# -- 8. journald priorities -----------------------------------------------------------------------
def journal(tmp_path, fmt: str):
    path = tmp_path / "journal"
    stream = path.open("w")
    info = os.fstat(stream.fileno())
    configure_logging("debug", fmt, stream=stream, environ={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    return stream, path


def test_lines_to_journald_carry_their_priority(tmp_path):
    stream, path = journal(tmp_path, "json")
    log = structlog.get_logger("iopfd.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    stream.close()
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e"]


def test_a_traceback_to_journald_keeps_its_priority_on_every_line(tmp_path):
    stream, path = journal(tmp_path, "console")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("iopfd.test").exception("failed")
    stream.close()
    lines = path.read_text().splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines


def test_no_priority_prefix_off_journald(tmp_path):
    out = tmp_path / "log"
    with out.open("w") as stream:
        other = os.stat(tmp_path)
        configure_logging("info", "json", stream=stream,
                          environ={"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"})  # another file's
        structlog.get_logger("iopfd.test").warning("w")
    assert out.read_text().startswith("{")
    buffer = io.StringIO()
    configure_logging("info", "json", stream=buffer, environ={})
    structlog.get_logger("iopfd.test").warning("w")
    assert buffer.getvalue().startswith("{")


# -- 9. the control commands and probe --json ----------------------------------------------------
@pytest.mark.asyncio
async def test_iopfd_status_and_detach_over_the_control_socket(tmp_path):
    async with servers_in_loop(tmp_path) as start:
        server, path = await start()
        emulated = EmulatedFaultQueue()
        server.queues.add("vm1", emulated.open(), policy="reject")
        for i in range(2):
            emulated.report(PageRequest(dev_id=1, addr=0x1000 * i))
        while len(emulated.answers) < 2:
            await asyncio.sleep(0.005)

        async def run(*args):
            return await asyncio.to_thread(iopfd, *args, "--socket", path)

        table = await run("status")
        assert table.returncode == 0, table.stderr
        header, row, total = table.stdout.splitlines()
        assert header.split() == ["queue", "policy", "reading", "pending", "faults", *OUTCOMES, "write_errors"]
        assert row.split() == ["vm1", "reject", "yes", "0", "2", "0", "2", "0", "0", "0", "0"]
        assert total.split() == ["(all)", "0", "2", "0", "2", "0", "0", "0"]
        reply = json.loads((await run("status", "--json")).stdout)
        assert [(q["name"], q["outcomes"]["invalid"]) for q in reply["queues"]] == [("vm1", 2)]
        detached = await run("detach", "vm1", "--json")
        assert detached.returncode == 0 and json.loads(detached.stdout)["outcomes"]["invalid"] == 2
        assert "vm1" not in server.engine.queues
        again = await run("detach", "vm1")
        assert again.returncode == 1 and "no queue named 'vm1' is served (no-such-queue)" in again.stderr
    emulated.close()


def test_iopfd_status_without_a_daemon_says_so(tmp_path):
    done = iopfd("status", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"nothing listens on {tmp_path / 'none.sock'}; is iopfd running?" in done.stderr


def test_probe_json_is_what_probe_finds():
    done = iopfd("probe", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["device"] == "/dev/iommu"
    assert [(f["name"], f["status"]) for f in found["features"]] == [(f.name, f.status) for f in probe()]


# -- background tasks ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_failed_background_task_is_logged_and_stops_the_watchdog(notify, tmp_path, monkeypatch):
    sock, path = notify
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    logged = io.StringIO()
    configure_logging("info", "json", stream=logged)
    server = Server(quiet_settings(tmp_path), Engine(), Policies({}), Notifier(path))
    calls = 0

    def status():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("success")  # what finding 1 was: the status task died unseen
        return "fine"

    server.status = status
    serving = asyncio.create_task(server.serve())
    await receive_until(sock, lambda m: m == b"WATCHDOG=1")
    while calls < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # a ping already on its way may still arrive
    sock.setblocking(False)
    while True:
        try:
            sock.recv(1000)
        except BlockingIOError:
            break
    await asyncio.sleep(0.3)
    late = []
    while True:
        try:
            late.append(sock.recv(1000))
        except BlockingIOError:
            break
    assert b"WATCHDOG=1" not in late
    server.request_stop()
    assert await asyncio.wait_for(serving, 10) == 0
    (failed,) = [json.loads(line) for line in logged.getvalue().splitlines() if "background task failed" in line]
    assert failed["task"] == "status updates" and failed["level"] == "error"
    assert "KeyError" in json.dumps(failed["exception"])


# -- 11. configuration errors ---------------------------------------------------------------------
def test_a_bad_value_from_the_environment_is_blamed_on_its_variable(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[defaults]\nresponse_deadline = 0.5\n")
    env = {**os.environ, "IOPFD_DEFAULTS__MAX_PENDING": "0"}
    done = iopfd("check-config", str(config), env=env)
    assert done.returncode == 78
    assert done.stderr.splitlines() == [
        f"the environment (not {config}): invalid configuration",
        "defaults.max_pending: Input should be greater than or equal to 1 (got '0') "
        "(from IOPFD_DEFAULTS__MAX_PENDING)"]


def test_a_table_from_the_environment_is_blamed_only_for_what_it_holds(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text("[control]\nmax_queues = 0\n")
    monkeypatch.setenv("IOPFD_CONTROL", '{"allowed_uids": [-1]}')
    with pytest.raises(ConfigError) as failed:
        load_settings(config)
    lines = dict(failed.value.lines)
    assert lines["control.allowed_uids.0"].endswith("(got -1) (from IOPFD_CONTROL)")
    assert "from" not in lines["control.max_queues"] and failed.value.in_file


@pytest.mark.parametrize("text, hint", [
    ('mode = "0660"', "control.mode: '0660' is not read as octal; write 0o660 (a TOML number, no quotes) or 432"),
    ("mode = 660", "control.mode: 660 is decimal and more than 0o777; write the mode in octal, 0o660, or in "
                   "decimal, 432"),
])
def test_a_mode_written_as_a_string_or_in_decimal_gets_a_hint(tmp_path, text, hint):
    config = tmp_path / "c.toml"
    config.write_text(f"[control]\n{text}\n")
    with pytest.raises(ConfigError) as failed:
        load_settings(config)
    assert str(failed.value) == hint


def test_an_octal_mode_from_the_environment_is_read_as_octal(monkeypatch):
    monkeypatch.setenv("IOPFD_CONTROL__MODE", "0o640")
    assert load_settings(None).control.mode == 0o640


def test_every_broken_policy_table_is_reported(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[policies.a]\ntype = "nope"\n[policies.b]\ntype = "rules"\ndefault = "zz"\n'
                      '[policies.c]\ntype = "rules"\ndefault = "b"\n')
    done = iopfd("check-config", str(config))
    assert done.returncode == 78
    lines = done.stderr.splitlines()
    assert lines[0] == f"{config}: invalid configuration"
    assert [line.split(":")[0] for line in lines[1:]] == ["policies.a.type", "policies.b.default"]
