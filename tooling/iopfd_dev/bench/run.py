"""The scenarios, run where the fault path is real (the lab guest, or a kernel with the mock IOMMU).

Each responder (the C floor, then iopfd as ``iopfd run`` with metrics and deadlines on) serves fresh
fault queues, each with a mock device; the C trigger (``bench/trigger.c``) raises the faults. Every
run ends with the kernel's word that nothing is left open: a response to each cookie is refused.
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
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iopfd.iommufd import PERM_READ, SUCCESS, FaultQueue, Iommufd

from iopfd.iommufd.selftest import FaultingMockSetup

SCENARIOS = ("burst", "steady", "storm", "multi")
MULTI_QUEUES = 8
STARTUP_TIMEOUT = 180  # importing iopfd takes ~12 s in the TCG guest
STORM_CONFIG = """\
policy = "slow"
[defaults]
response_deadline = 1.0
max_pending = 4096
[policies.slow]
type = "iopfd_dev.policies:DelayPolicy"
seconds = 0.005
"""


@dataclass(frozen=True)
class Tools:
    """The compiled C programs: the floor responder and the fault trigger."""

    responder: str
    trigger: str


@dataclass
class Result:
    scenario: str
    responder: str  # "c" or "iopfd"
    groups: int
    answered: int
    seconds: float  # first read to last write, by the responder's own clock
    cpu_seconds: float
    maxrss_kb: int
    source: str = "kernel"  # the lab kernel's fault queues, or "emulated"
    queues: int = 1
    offered_rate: float | None = None  # steady: groups/s the trigger achieved
    latency: dict | None = None  # iopfd only: p50, p99, p99.9, max (seconds)
    latency_cdf: list[float] = field(default_factory=list)  # iopfd only: the 0th..100th percentiles
    late: int | None = None  # groups answered later than deadline + 50 ms
    shed: int | None = None
    runs: list[float] = field(default_factory=list)  # groups/s of every repeat; this is the median one

    @property
    def groups_per_second(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_group(self) -> float:
        return self.cpu_seconds / self.answered * 1e6 if self.answered else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"groups_per_second": self.groups_per_second, "cpu_us_per_group": self.cpu_us_per_group}

    @classmethod
    def from_report(cls, scenario: str, groups: int, report: dict, **extra) -> Result:
        """From ``iopfd run --report``'s JSON: every queue's groups, from the first read of any to the last write."""
        queues = report["queues"].values()
        first = min(q["first_read"] for q in queues if q["first_read"] is not None)
        last = max(q["last_write"] for q in queues if q["last_write"] is not None)
        overall = report["overall"]
        return cls(scenario, "iopfd", groups, sum(sum(q["outcomes"].values()) for q in queues), last - first,
                   report["cpu_seconds"], report["maxrss_kb"], queues=len(queues), latency=overall["latency"],
                   latency_cdf=overall["cdf"], late=overall["late"], shed=sum(q["outcomes"]["shed"] for q in queues),
                   **extra)


class Responder:
    """The C floor or ``iopfd run``, started on ``queues``' fds and ready to answer."""

    def __init__(self, kind: str, queues: list[FaultQueue], tmp: Path, tools: Tools, config: str = "") -> None:
        self.kind = kind
        self.report = tmp / f"{kind}-report.json"
        fds = [queue.fd for queue in queues]
        if kind == "c":
            self.proc = subprocess.Popen([tools.responder, *map(str, fds)], pass_fds=fds, stdout=subprocess.PIPE,
                                         text=True)
            return
        (tmp / "iopfd.toml").write_text(config)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(str(tmp / f"notify-{time.monotonic_ns()}"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iopfd", "run", "--config", str(tmp / "iopfd.toml"),
             *(arg for i, fd in enumerate(fds) for arg in ("--fault-fd", f"{fd}:bench-{i}")),
             "--metrics-address", "127.0.0.1:0", "--report", str(self.report)],
            pass_fds=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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


def start_trigger(tools: Tools, ctx: Iommufd, rig: FaultingMockSetup, count: int, rate: float = 0) -> subprocess.Popen:
    """Start raising ``count`` single-record faults on ``rig``'s device, at ``rate`` per second (0: at
    once), with the C trigger; its stdout will be one JSON line of figures."""
    request, arg = rig.device.trigger_iopf_ioctl(addr=0x1000, perm=PERM_READ)
    return subprocess.Popen([tools.trigger, str(ctx.fd), hex(request), arg.hex(), str(count), repr(rate)],
                            pass_fds=[ctx.fd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_trigger(started: subprocess.Popen, timeout: float = 3600) -> dict:
    """Wait for a trigger; returns its figures (``seconds``, and ``max_behind``, its worst lag behind the rate)."""
    out, err = started.communicate(timeout=timeout)
    if started.returncode != 0:
        raise RuntimeError(f"the fault trigger failed: {err.strip()}")
    return json.loads(out)


def trigger(tools: Tools, ctx: Iommufd, rig: FaultingMockSetup, count: int, rate: float = 0) -> dict:
    return finish_trigger(start_trigger(tools, ctx, rig, count, rate))


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


def startup_seconds(runs: int = 5) -> float:
    """Median time from exec to READY=1 of ``iopfd run`` with the default config (metrics endpoint,
    device watching, crash recovery on) and a control socket as its only source of queues."""
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.bind(f"{tmp}/notify")
            notify.settimeout(STARTUP_TIMEOUT)
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "iopfd", "run", "--metrics-address", "127.0.0.1:0"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify",
                                         "IOPFD_CONTROL__PATH": f"{tmp}/control.sock", "IOPFD_RUNTIME_DIR": tmp})
            try:
                while b"READY=1" not in notify.recv(4096).split(b"\n"):
                    pass
                times.append(time.monotonic() - started)
            finally:
                proc.terminate()
                proc.wait(60)
    return sorted(times)[len(times) // 2]


def shares(groups: int, queues: int) -> list[int]:
    """``groups`` split over ``queues`` as evenly as integers allow."""
    return [groups // queues + (i < groups % queues) for i in range(queues)]


def run_scenario(scenario: str, kind: str, groups: int, tools: Tools, *, rate: float = 0) -> Result:
    counts = shares(groups, MULTI_QUEUES if scenario == "multi" else 1)
    with Iommufd.open() as ctx, ExitStack() as stack, tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp:
        queues = [stack.enter_context(FaultQueue.alloc(ctx)) for _ in counts]
        rigs = [stack.enter_context(FaultingMockSetup(ctx, queue.id)) for queue in queues]
        responder = Responder(kind, queues, Path(tmp), tools, STORM_CONFIG if scenario == "storm" else "")
        offered = None
        if scenario == "steady":
            offered = trigger(tools, ctx, rigs[0], groups, rate)
        else:
            # Queue the whole burst first, then let the responder at it: its own clock measures how
            # fast it drains, not how fast the trigger raises faults. (The storm is throttled by its
            # policy, not by the trigger, so it runs the same way.)
            os.kill(responder.proc.pid, signal.SIGSTOP)
            for rig, count in zip(rigs, counts):
                trigger(tools, ctx, rig, count)
            os.kill(responder.proc.pid, signal.SIGCONT)
        for queue in queues:
            _wait_drained(queue, settle=1.5 if scenario == "storm" else 0.3)
        figures = responder.finish()
        for queue, count in zip(queues, counts):
            _assert_nothing_open(queue, count)
    extra = {"offered_rate": groups / offered["seconds"]} if offered else {}
    if kind == "c":
        return Result(scenario, kind, groups, figures["groups"], figures["last_write"] - figures["first_read"],
                      figures["cpu_seconds"], figures["maxrss_kb"], queues=len(counts), **extra)
    return Result.from_report(scenario, groups, figures, **extra)
