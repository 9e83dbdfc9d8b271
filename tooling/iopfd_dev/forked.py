"""``iopfd run`` forked from an interpreter that has already imported it: the lab's lighter start path.

In the lab guest (TCG, the host's root over 9p) importing the daemon costs several seconds of CPU
per start, and the fault-injection and recovery tests start daemons by the dozen. A forked child of
the test process, which has the daemon's modules imported, runs the same ``iopfd.cli.main`` on the
same argv, environment and inherited fds as an exec'd one would; only start-up imports are skipped.
Tests that are about the process itself (start-up, imports, systemd) exec the real command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

# What ``iopfd run`` imports while it starts (iopfd/cli.py's _cmd_run and what it builds): imported
# here once, so that forked children start without importing.
PRELOAD = ("iopfd.cli", "iopfd.service.config", "iopfd.service.logging", "iopfd.service.server",
           "iopfd.service.metrics", "iopfd.policies.rules", "iopfd.policies.forward", "iopfd.policies.ioas_map",
           "numpy")


def preload() -> None:
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)


class ForkedProcess:
    """The parts of ``subprocess.Popen`` the tests use, for a forked child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if timeout is not None and deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"iopfd (pid {self.pid})", timeout)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_iopfd(argv: Sequence[str], *, env: Mapping[str, str], pass_fds: Sequence[int], output: int,
               before_main: Callable[[], None] | None = None) -> ForkedProcess:
    """Fork and run ``iopfd ARGV`` in the child, as if exec'd with ``env``, stdin from /dev/null,
    stdout and stderr to the fd ``output`` and only ``pass_fds`` inherited. ``before_main`` runs in
    the child just before (e.g. moving an fd to 3, as systemd does)."""
    preload()
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    status = 1
    try:
        _become_exec_like(env, pass_fds, output)
        if before_main is not None:
            before_main()
        from iopfd.cli import main

        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _become_exec_like(env: Mapping[str, str], pass_fds: Sequence[int], output: int) -> None:
    """What exec would have given the child: default signal handlers, the three standard fds, only
    the passed fds beyond them, and the environment."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it up at start
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    keep = sorted({0, 1, 2, *pass_fds})
    for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")]):
        os.closerange(low + 1, high)
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    os.environ.clear()
    os.environ.update(env)
    # exec would have put PYTHONPATH first on sys.path, where plug-ins and their entry points are found
    sys.path[:0] = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    # pytest's captured streams are not the fds: write straight to them, unbuffered as PYTHONUNBUFFERED asks.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
