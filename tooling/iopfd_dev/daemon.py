"""``iopfd run`` as systemd or a VMM starts it, for the tests, the demo and the benches: a process of
its own with its fds inherited and NOTIFY_SOCKET owned here (READY=1 awaited, the fd store played);
and the kernel's word on what a daemon left open (``open_cookies``)."""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from iopfd.iommufd import FaultQueue
from iopfd.service.recovery import sweep
from iopfd_dev.forked import ForkedProcess, fork_iopfd

STARTUP_TIMEOUT = 180  # seconds: 5-15 s in the TCG lab guest, several times that on a host busy with other guests
STATUS_ANSWERED = re.compile(r"(\d+) groups answered")
# Start a command the way systemd starts a service with passed fds: ``python -c AS_SYSTEMD FD CMD...``
# puts FD at 3, sets LISTEN_PID to the process's own pid and execs CMD (the caller sets LISTEN_FDS*).
AS_SYSTEMD = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
              "os.execv(sys.argv[2], sys.argv[2:])")


class DaemonError(Exception):
    """The daemon exited, or did not say what was waited for; the message has its log."""


class DaemonProcess:
    def __init__(self, directory: Path, pass_fds: Sequence[int], *args: str, env: dict[str, str] | None = None,
                 program: Sequence[str] = ("-m", "iopfd", "run"), systemd_fd: int | None = None,
                 forked: bool = False) -> None:
        """Start ``program`` (what the interpreter runs, default ``iopfd run``) with ``args`` and the
        fds ``pass_fds`` inherited; its notify socket and log file are in ``directory``.
        ``systemd_fd``: one of ``pass_fds``, passed at fd 3 with LISTEN_PID set, as systemd passes fds
        (the caller sets LISTEN_FDS and LISTEN_FDNAMES). ``forked``: ``iopfd run`` forked from this
        process instead of exec'd (``iopfd_dev.forked``: the same daemon without start-up imports)."""
        self.notify_path = directory / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.stored_fds: dict[str, int] = {}  # what FDSTORE=1 handed us, playing systemd's fd store
        self.log_path = directory / "iopfd.log"
        self._log = self.log_path.open("wb")
        # Unbuffered, so a daemon that fails to start has its log lines in output() all the same.
        environ = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | ForkedProcess
        if forked:
            if tuple(program) != ("-m", "iopfd", "run"):
                raise ValueError("only iopfd run can be forked")
            self.proc = fork_iopfd(["run", *args], env=environ, pass_fds=pass_fds, output=self._log.fileno(),
                                   before_main=None if systemd_fd is None else partial(_as_systemd, systemd_fd))
            return
        prefix = () if systemd_fd is None else (sys.executable, "-c", AS_SYSTEMD, str(systemd_fd))
        self.proc = subprocess.Popen([*prefix, sys.executable, *program, *args], pass_fds=pass_fds,
                                     env=environ, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)

    def wait_message(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        """The first notify message (old or new) for which ``predicate`` holds."""
        for message in self.messages:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.notify.settimeout(min(left, 0.5))
            try:
                message = self._receive()
            except TimeoutError:
                if self.proc.poll() is not None:  # nothing queued and nobody left to send
                    raise DaemonError(f"iopfd exited with {self.proc.returncode}:\n{self.output()}") from None
                continue
            self.messages.append(message)
            if predicate(message):
                return message
        raise DaemonError(f"no such notify message in {timeout} s; got {self.messages[-5:]}\n{self.output()}")

    def _receive(self) -> str:
        fds = array.array("i")
        data, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_LEN(16 * fds.itemsize))
        message = data.decode()
        for _level, _kind, payload in ancillary:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        fields = dict(line.partition("=")[::2] for line in message.splitlines())
        if "FDSTOREREMOVE" in fields and fields.get("FDNAME") in self.stored_fds:
            os.close(self.stored_fds.pop(fields["FDNAME"]))
        for fd in fds:
            if "FDSTORE" in fields:
                self.stored_fds[fields.get("FDNAME", "unknown")] = fd
            else:
                os.close(fd)
        return message

    def wait_ready(self) -> None:
        self.wait_message(lambda m: "READY=1" in m.splitlines(), timeout=STARTUP_TIMEOUT)

    def wait_answered(self, groups: int, timeout: float = 120.0) -> None:
        def enough(message: str) -> bool:
            found = STATUS_ANSWERED.search(message)
            return found is not None and int(found.group(1)) >= groups
        self.wait_message(enough, timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; then empty the fd store, as systemd does when a service stops."""
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        self.drain()
        for fd in self.stored_fds.values():
            os.close(fd)
        self.stored_fds.clear()
        return status

    def drain(self) -> None:
        """Take in every notify message already sent (the daemon drops them once the queue is full)."""
        self.notify.setblocking(False)
        try:
            while True:
                self.messages.append(self._receive())
        except BlockingIOError:
            pass
        finally:
            self.notify.setblocking(True)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict]:
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def totals(self) -> dict:
        """The counts the daemon logs as it exits."""
        (stopped,) = [event for event in self.log_events() if event["event"] == "stopped"]
        return stopped

    def close(self) -> None:
        for fd in self.stored_fds.values():
            os.close(fd)
        self.stored_fds.clear()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        self._log.close()


def _as_systemd(fd: int) -> None:
    """What AS_SYSTEMD does, in a forked child."""
    os.dup2(fd, 3)
    os.environ["LISTEN_PID"] = str(os.getpid())


def spawn_daemon(directory: Path, pass_fds: Sequence[int], *args: str, **options) -> DaemonProcess:
    """A DaemonProcess (same arguments) that has sent READY=1: every queue it was given is read.
    Raises DaemonError, the process gone, if it exits or stays silent for STARTUP_TIMEOUT."""
    daemon = DaemonProcess(directory, pass_fds, *args, **options)
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.close()
        raise
    return daemon


def open_cookies(queue: FaultQueue, upto: int) -> list[int]:
    """The cookies in 1..upto the kernel still holds open, that is groups read and never answered
    (cookies are lowest-free, so 1..upto covers every cookie of ``upto`` groups). Each is answered
    INVALID on the way, as the daemon's crash recovery sweeps them."""
    return sweep(queue, upto)
