"""The scenarios, run where the fault path is real (the lab guest, or a kernel with the mock IOMMU).

Each responder (the C floor, then iopfd as ``iopfd run`` with metrics and deadlines on) serves a
fresh fault queue with a mock device; this process triggers the faults. Every run ends with the
kernel's word that nothing is left open: a response to each cookie is refused.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from iopfd.iommufd import PERM_READ, SUCCESS, FaultingMockSetup, FaultQueue, Iommufd

STARTUP_TIMEOUT = 180  # importing iopfd takes ~12 s in the TCG guest
STORM_CONFIG = """\
policy = "slow"
[defaults]
response_deadline = 1.0
max_pending = 4096
[policies.slow]
type = "bench-delay"
seconds = 0.005
"""


@dataclass
class Result:
    scenario: str
    responder: str
    groups: int
    answered: int
    seconds: float  # first read to last write, by the responder's own clock
    cpu_seconds: float
    maxrss_kb: int
    latency: dict | None = None  # iopfd only: p50, p99, p99.9, max (seconds)
    late: int | None = None  # storm: groups answered later than deadline + 50 ms
    shed: int | None = None

    @property
    def groups_per_second(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_group(self) -> float:
        return self.cpu_seconds / self.answered * 1e6 if self.answered else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"groups_per_second": self.groups_per_second, "cpu_us_per_group": self.cpu_us_per_group}


class Responder:
    """The C floor or ``iopfd run``, started on ``queue``'s fd and ready to answer."""

    def __init__(self, kind: str, queue: FaultQueue, tmp: Path, c_binary: str, config: str = "") -> None:
        self.kind = kind
        self.report = tmp / f"{kind}-report.json"
        if kind == "c":
            self.proc = subprocess.Popen([c_binary, str(queue.fd)], pass_fds=[queue.fd], stdout=subprocess.PIPE,
                                         text=True)
            return
        (tmp / "iopfd.toml").write_text(config)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(str(tmp / f"notify-{time.monotonic_ns()}"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iopfd", "run", "--config", str(tmp / "iopfd.toml"), "--fault-fd",
             f"{queue.fd}:bench", "--metrics-address", "127.0.0.1:0", "--report", str(self.report)],
            pass_fds=[queue.fd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": notify.getsockname(), "IOPFD_CONTROL__PATH": "off",
                 "IOPFD_WATCH_DEVICES": "false", "IOPFD_RUNTIME_DIR": str(tmp)})
        notify.settimeout(STARTUP_TIMEOUT)
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
        finally:
            notify.close()

    def finish(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        if self.kind == "c":
            out, _ = self.proc.communicate(timeout=60)
            return json.loads(out)
        if self.proc.wait(timeout=120) != 0:
            raise RuntimeError(f"iopfd exited with {self.proc.returncode}")
        return json.loads(self.report.read_text())


def _trigger(rig, count: int, *, rate: float | None = None) -> None:
    device = rig.device
    if rate is None:
        for i in range(count):
            device.trigger_iopf(addr=0x1000 * (i + 1), grpid=i % 512, perm=PERM_READ)
        return
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        device.trigger_iopf(addr=0x1000 * (i + 1), grpid=i % 512, perm=PERM_READ)


def _wait_drained(queue: FaultQueue, settle: float = 0.3, timeout: float = 600) -> None:
    """Until the responder has read everything and had ``settle`` seconds to write it back."""
    deadline = time.monotonic() + timeout
    while select.select([queue.fd], [], [], 0)[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the responder stopped reading")
        time.sleep(0.05)
    time.sleep(settle)


def _assert_nothing_open(queue: FaultQueue, groups: int) -> None:
    if select.select([queue.fd], [], [], 0)[0]:
        raise RuntimeError("groups left undelivered")
    open_cookies = [c for c in range(1, groups + 1) if queue.respond([(c, SUCCESS)])]
    if open_cookies:
        raise RuntimeError(f"{len(open_cookies)} groups left unanswered, e.g. cookie {open_cookies[0]}")


def run_scenario(scenario: str, kind: str, groups: int, c_binary: str, *, rate: float | None = None) -> Result:
    with Iommufd.open() as ctx, FaultQueue.alloc(ctx) as queue, FaultingMockSetup(ctx, queue.id) as rig, \
            tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp:
        responder = Responder(kind, queue, Path(tmp), c_binary, STORM_CONFIG if scenario == "storm" else "")
        if scenario == "burst":
            # Queue the whole burst first, then let the responder at it: its own clock measures how
            # fast it drains, not how fast this process can trigger.
            os.kill(responder.proc.pid, signal.SIGSTOP)
            _trigger(rig, groups)
            os.kill(responder.proc.pid, signal.SIGCONT)
        else:
            _trigger(rig, groups, rate=rate)
        _wait_drained(queue, settle=1.5 if scenario == "storm" else 0.3)
        figures = responder.finish()
        _assert_nothing_open(queue, groups)
    if kind == "c":
        return Result(scenario, kind, groups, figures["groups"], figures["last_write"] - figures["first_read"],
                      figures["cpu_seconds"], figures["maxrss_kb"])
    (stats,) = figures["queues"].values()
    return Result(scenario, kind, groups, sum(stats["outcomes"].values()), stats["last_write"] - stats["first_read"],
                  figures["cpu_seconds"], figures["maxrss_kb"], latency=stats["latency"], late=stats["late"],
                  shed=stats["outcomes"]["shed"])
