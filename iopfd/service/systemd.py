"""systemd integration without libsystemd: sd_notify(3) messages and the service watchdog.

Everything here is a silent no-op when the daemon is not run by systemd (no NOTIFY_SOCKET), and
failing to notify never raises: a missing notification must not take the daemon down.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("iopfd.systemd")


class Notifier:
    """Sends sd_notify datagrams (newline-separated KEY=VALUE lines) to ``address``, if any."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._failing = False
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # never stall the event loop on a full notify queue

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        address = environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str | None = None, /, *, fds: tuple[int, ...] = (), **fields: object) -> bool:
        """Send ``message`` and/or ``fields`` as KEY=VALUE lines, with ``fds`` as SCM_RIGHTS; True if
        the datagram went out."""
        if self._sock is None:
            return False
        # A newline in a value would start another assignment, so values are flattened to one line.
        lines = [message] if message else []
        lines += [f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg(["\n".join(lines).encode()], ancillary, 0, self._address)
        except OSError as exc:
            if not self._failing:  # once per outage, not once per watchdog tick
                log.warning("cannot notify systemd", address=self._address, error=str(exc))
                self._failing = True
            return False
        self._failing = False
        return True

    def ready(self) -> bool:
        return self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def store_fd(self, fd: int, name: str) -> bool:
        """Keep ``fd`` in systemd's fd store (FileDescriptorStoreMax=) under ``name``: it comes back
        in LISTEN_FDS/LISTEN_FDNAMES when the service restarts."""
        return self.send(FDSTORE=1, FDNAME=name, fds=(fd,))

    def remove_fd(self, name: str) -> bool:
        return self.send(FDSTOREREMOVE=1, FDNAME=name)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or None."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if pid and int(pid) != os.getpid():
            return None  # the watchdog is meant for another process (e.g. our parent)
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("ignoring an invalid WATCHDOG_USEC or WATCHDOG_PID", WATCHDOG_USEC=usec, WATCHDOG_PID=pid)
        return None
    return value / 2 / 1_000_000


async def run_watchdog(notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
    """Send WATCHDOG=1 every ``interval`` seconds while the daemon is healthy; runs until cancelled.

    A ping is skipped when ``healthy()`` is false (or raises), and when the event loop was so blocked
    that this sleep overran by ``interval`` or more: by then the last ping is at least 2 * interval
    (the whole watchdog timeout) old, so a stalled loop must not be vouched for.
    """
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        overrun = loop.time() - start - interval
        if overrun >= interval:
            log.warning("watchdog ping skipped", reason="event loop stalled", overrun_s=round(overrun, 3))
            continue
        try:
            ok = healthy()
        except Exception:
            log.exception("watchdog health check raised")
            ok = False
        if ok:
            notifier.watchdog()
        else:
            log.warning("watchdog ping skipped", reason="unhealthy")


LISTEN_FDS_START = 3


def listen_fds(environ: Mapping[str, str] = os.environ) -> dict[str, list[int]]:
    """The fds systemd passed (socket activation, fd store), by FileDescriptorName / FDNAME.

    Only when LISTEN_PID names this process; unnamed fds are listed under "unknown", as sd_listen_fds
    does. The fds are made close-on-exec: nothing iopfd starts should inherit them.
    """
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        log.warning("ignoring an invalid LISTEN_FDS", LISTEN_FDS=environ.get("LISTEN_FDS"))
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    found: dict[str, list[int]] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        found.setdefault(name, []).append(fd)
    return found
