"""The scenarios, run where the fault path is real (the lab guest, or a kernel with the mock IOMMU).

Every run has fault queues of its own, each with a mock device, and the C trigger
(``bench/trigger.c``) raises its faults. A C loop (``bench/responder.c``) is started per run; iopfd
is one ``iopfd run`` for the whole bench: a daemon start takes 5-15 s in the TCG guest, so it is
started once with every queue of every iopfd run in its config, each queue with the policy its run
measures, and the forward peers on their channels; the runs then take turns. A run is observed from
outside: iopfd's CPU time from /proc/PID/stat around the run, and at the end each queue's counts,
clock and latency from the report of ``iopfd_dev.bench.recorder``, which runs the daemon with an
observer on every queue. Every run must answer every group it raised.

The ``ioas-map`` policy (demand paging) runs in the burst only, against its own C loop, ``c-map``
(``bench/mapper.c``: one IOMMU_IOAS_MAP per fault), and only where paging HWPTs deliver faults (Linux
6.13+; elsewhere the bench says it skips them). Its faults lie in a window of the mock IOMMU's
aperture backed by one memfd. The policy maps into the IOAS of its queue's iommufd, which iopfd holds
only for queues it brokered, so iopfd's ioas-map queues are brokered over the control socket and the
bench builds their rigs in the iommufd iopfd hands back. After each ioas-map run its IOAS is unmapped.
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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iopfd.client import Client
from iopfd.iommufd import PERM_READ, FaultQueue, Iommufd
from iopfd.iommufd.ioctl import lib, new
from iopfd.iommufd.selftest import FaultingMockSetup, PagingMockSetup
from iopfd.service.config import QueueDefaults
from iopfd.uapi_ffi import ffi
from iopfd_dev.bench.recorder import PROFILE_ENV, TRACED_ENV, percentiles
from iopfd_dev.bench.tools import Tools
from iopfd_dev.daemon import spawn_daemon
from iopfd_dev.policies import DelayPolicy, ImmediatePolicy, import_path

SCENARIOS = ("burst", "steady", "storm", "multi", "seed")
POLICIES = ("accept", "reject", "rules", "plugin", "forward", "forward-py", "ioas-map")
# The C loops: the floor (poll, read 256 records until empty, one write per read), and a loop that
# reads as QEMU's VT-d PRQ series does (one read of 100 records per wakeup, one write per group).
C_LOOPS = {"c": ("-r", "256"), "c-qemu": ("-q", "-r", "100")}
# ioas-map (demand paging) runs in the burst only, against the C loop that maps one fault at a time
# (bench/mapper.c: read 256 records until empty, one IOMMU_IOAS_MAP per fault, one write per read).
PAGING_POLICY = "ioas-map"
C_MAP = "c-map"
WINDOW = lib.MOCK_APERTURE_START  # fault i of an ioas-map run is at WINDOW + i pages
PAGE = 4096
# In an iommufd iopfd brokers the fault object is ID 1, so the first IOAS the bench makes in it is ID 2.
BROKERED_IOAS_ID = 2
# A brokered queue takes its settings from [defaults]. The burst queues every group at once and
# their clocks start together: at the product's 1 s deadline, a burst that takes longer than that to
# map is answered by the deadline (a 50 000-group burst in the TCG guest: all but the first read), and
# then nothing is mapped to compare. The ioas-map runs measure CPU per mapped group, so their deadline
# is this; every queue of the config states its own (the product's default), unchanged.
IOAS_MAP_DEADLINE = 60.0  # the most iopfd accepts
# Before ioas-map is measured, iopfd serves a burst of this many groups on a brokered queue of its own
# (not reported): the policy's first batch pages its code paths in (numpy over 9p in the lab guest).
WARM_UP = "warm-up"
WARM_UP_GROUPS = 1000
MULTI_QUEUES = 8
STEADY_RATES = (5000, 20000, 50000)
STEADY_SECONDS = 1.0  # a steady run offers its rate for this long
SEED_THREADS = (8, 16, 32, 64, 128, 256, 512)
SEED_FAULTS_PER_THREAD = 200  # 512 threads: 102 400 faults, the shape of the original report
SEED_RESPONDERS = (("c-qemu", None), ("iopfd", "rules"), ("iopfd", "forward"))
PEER_RECORDS = 256
STOP_TIMEOUT = 1200
STORM: dict[str, Any] = {"policy": "slow", "response_deadline": 1.0, "max_pending": 4096}
# The policies of the bench's daemon. `rules` is the demo's: accept what lies below 0x8000_0000 and
# asks for read/write only, reject the rest.
POLICY_TABLES = f"""\
[policies.rules]
type = "rules"
default = "reject"
[[policies.rules.rules]]
address = [0x0, 0x8000_0000]
perm = ["read", "write"]
policy = "accept"
[policies.plugin]
type = "{import_path(ImmediatePolicy)}"
[policies.forward]
type = "forward"
[policies.forward-py]
type = "forward"
[policies.slow]
type = "{import_path(DelayPolicy)}"
seconds = 0.005
"""
# Added when a run uses it: the window spans the largest ioas-map run, backed by the bench's memfd.
IOAS_MAP_TABLE = """\
[defaults]
response_deadline = {deadline}
[policies.ioas-map]
type = "ioas-map"
ioas_id = {ioas_id}
iova = {window:#x}
length = {length:#x}
backing = "{backing}"
page_size = {page}
"""
FIRST_ADDR = 0x1000  # fault i of a run is at FIRST_ADDR + i pages


@dataclass
class Result:
    scenario: str
    responder: str  # "c", "c-qemu" or "iopfd"
    groups: int
    answered: int
    seconds: float  # first read to last write, by the responder's own clock
    cpu_seconds: float
    maxrss_kb: int
    policy: str | None = None  # iopfd's policy
    source: str = "kernel"  # the lab kernel's fault queues, or "emulated"
    kernel: str = ""  # the release of the kernel it ran on
    queues: int = 1
    offered_rate: float | None = None  # steady: groups/s the trigger achieved
    latency: dict | None = None  # iopfd only: p50, p99, p99.9, max (seconds), from the group's clock start
    late: int | None = None  # groups answered later than deadline + 50 ms
    shed: int | None = None
    outcomes: dict | None = None  # iopfd only: groups by outcome
    peer_cpu_seconds: float | None = None  # forward: the peer's CPU time in this run
    threads: int | None = None  # seed: threads raising faults at once
    worst: float | None = None  # seed: the longest time from raising a fault to its answer
    # steady: p50, p99, p99.9, max (seconds) from the trigger raising each fault to its answer, for the C loop
    # and iopfd alike (``latency`` runs from iopfd's clock start, which the C loop does not have)
    from_raise: dict | None = None
    runs: list[float] = field(default_factory=list)  # groups/s of every repeat; this is the median one

    @property
    def label(self) -> str:
        return self.responder if self.policy is None else f"iopfd {self.policy}"

    @property
    def scenario_label(self) -> str:
        if self.scenario == "steady" and self.offered_rate is not None:
            return f"{self.scenario} {self.offered_rate / 1000:.0f}k/s"
        return self.scenario

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def groups_per_second(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_group(self) -> float:
        return self.cpu_seconds / self.answered * 1e6 if self.answered else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"groups_per_second": self.groups_per_second, "cpu_us_per_group": self.cpu_us_per_group}


@dataclass
class Run:
    """One run of the plan: a responder (and iopfd's policy) on fault queues of its own."""

    scenario: str
    responder: str
    policy: str | None
    groups: int
    rate: float = 0.0
    threads: int = 1
    queues: list[FaultQueue] = field(default_factory=list)
    rigs: list[FaultingMockSetup] = field(default_factory=list)
    name: str = ""  # iopfd: the queues are NAME-0, NAME-1, ...
    result: Result | None = None  # made by execute()
    raised: list[tuple[int, float]] = field(default_factory=list)  # seed, steady: (addr, when raised) of every fault
    ctx: Iommufd | None = None  # brokered: the iommufd iopfd opened for the queue (else the bench's)

    @property
    def paging(self) -> bool:
        """Demand paging: faults on a paging HWPT, in the window the backing memfd maps."""
        return self.responder == C_MAP or self.policy == PAGING_POLICY

    @property
    def brokered(self) -> bool:
        """iopfd brokers the queue (ioas-map maps into the queue's iommufd): the bench holds no fault fd."""
        return self.responder == "iopfd" and self.policy == PAGING_POLICY

    @property
    def first_addr(self) -> int:
        return WINDOW if self.paging else FIRST_ADDR

    @property
    def names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(MULTI_QUEUES if self.scenario == "multi" else 1)]

    @property
    def measured(self) -> Result:
        """The run's result, once execute() has made it."""
        assert self.result is not None
        return self.result


def plan(scenarios: list[str], policies: list[str], groups: int, repeat: int,
         seed_faults: int = SEED_FAULTS_PER_THREAD) -> list[Run]:
    """Every run, in the order they take turns: C loops and iopfd alternate within each repeat, so a
    noisy stretch of the host hits both alike. A steady run offers its rate for STEADY_SECONDS (at
    most ``groups``); each seed thread raises ``seed_faults``. ioas-map runs in the burst only, with
    its C map loop before it, and a warm-up run (not reported) before all."""
    runs: list[Run] = []
    responders = [("c", None), ("c-qemu", None), *(("iopfd", p) for p in policies if p != PAGING_POLICY)]
    paging = [(C_MAP, None), ("iopfd", PAGING_POLICY)] if PAGING_POLICY in policies else []
    if paging and "burst" in scenarios:
        runs.append(Run(WARM_UP, "iopfd", PAGING_POLICY, min(groups, WARM_UP_GROUPS)))
    for scenario in scenarios:
        if scenario == "burst":
            runs += [Run("burst", r, p, groups) for _ in range(repeat) for r, p in responders + paging]
        elif scenario == "steady":
            runs += [Run("steady", r, p, min(groups, int(rate * STEADY_SECONDS)), rate)
                     for rate in STEADY_RATES for r, p in responders if r != "c-qemu"]
        elif scenario == "storm":
            runs.append(Run("storm", "iopfd", STORM["policy"], groups))
        elif scenario == "multi":
            runs += [Run("multi", r, p, groups) for _ in range(repeat) for r, p in (("c", None), ("iopfd", "accept"))]
        elif scenario == "seed":
            runs += [Run("seed", r, p, threads * seed_faults, threads=threads)
                     for r, p in SEED_RESPONDERS if p is None or p in policies for threads in SEED_THREADS]
    return runs


def shares(groups: int, queues: int) -> list[int]:
    """``groups`` split over ``queues`` as evenly as integers allow."""
    return [groups // queues + (i < groups % queues) for i in range(queues)]


def run_bench(scenarios: list[str], policies: list[str], groups: int, tools: Tools, repeat: int,
              seed_faults: int = SEED_FAULTS_PER_THREAD, profile: str | None = None) -> list[Result]:
    runs = plan(scenarios, policies, groups, repeat, seed_faults)
    if any(run.paging for run in runs):
        why = paging_unsupported()
        if why:
            print(f"[bench] ioas-map and {C_MAP}: SKIPPED on {os.uname().release}: {why}", file=sys.stderr, flush=True)
            runs = [run for run in runs if not run.paging]
    with Iommufd.open() as ctx, ExitStack() as stack, tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp:
        backing = stack.enter_context(_backing(max((run.groups for run in runs if run.paging), default=0)))
        for index, run in enumerate(runs):
            run.name = f"{run.scenario}-{index}"
            if run.brokered:
                continue  # iopfd makes its queue once it runs (Daemon.broker)
            for _ in run.names:
                queue = stack.enter_context(FaultQueue.alloc(ctx))
                run.queues.append(queue)
                rig = PagingMockSetup if run.paging else FaultingMockSetup
                run.rigs.append(stack.enter_context(rig(ctx, queue.id)))
        served = [run for run in runs if run.responder == "iopfd"]
        daemon = Daemon(served, Path(tmp), tools, backing, profile) if served else None
        try:
            for run in served:
                if run.brokered:
                    assert daemon is not None
                    daemon.broker(run, stack)
            for index, run in enumerate(runs, 1):
                threads = f" {run.threads} threads" if run.scenario == "seed" else ""
                print(f"[bench] {index}/{len(runs)} {run.scenario}"
                      f"{f' {run.rate / 1000:g}k/s' if run.rate else ''}{threads}:"
                      f" {run.responder}{f' {run.policy}' if run.policy else ''} ...", file=sys.stderr, flush=True)
                execute(run, ctx, tools, daemon, Path(tmp), backing)
                if run.paging:  # its pages stay pinned until unmapped: the next run starts from nothing
                    run.rigs[0].ioas.unmap()
        finally:
            report = daemon.stop() if daemon else None
        if report is not None:  # there were iopfd runs
            for run in served:
                finish_iopfd(run, report)
        for run in runs:
            check_answered(run)
    release = os.uname().release
    results = median_of_repeats([run for run in runs if run.scenario != WARM_UP])
    for r in results:
        r.kernel = release
    return results


def paging_unsupported() -> str | None:
    """Why this kernel cannot run ioas-map (no faults from paging HWPTs), or None when it can."""
    from iopfd.iommufd.probe import PAGING_HWPT_FAULTS, YES, probe

    (feature,) = [f for f in probe() if f.name == PAGING_HWPT_FAULTS]
    if feature.status == YES:
        return None
    return f"it delivers no faults from paging HWPTs (Linux 6.13+ does; iopfd probe: {feature.detail})"


@contextmanager
def _backing(pages: int) -> Iterator[int | None]:
    """The memfd the ioas-map runs map from, ``pages`` pages long (None when no run maps)."""
    if not pages:
        yield None
        return
    fd = os.memfd_create("iopfd-bench-backing")
    try:
        os.ftruncate(fd, pages * PAGE)
        yield fd
    finally:
        os.close(fd)


class Daemon:
    """``iopfd run`` serving the queues of every iopfd run, with the forward peers on their channels,
    under ``iopfd_dev.bench.recorder`` (which writes the report at exit)."""

    def __init__(self, runs: list[Run], tmp: Path, tools: Tools, backing: int | None = None,
                 profile: str | None = None) -> None:
        self.report_path = tmp / "report.json"
        # The control socket brokers ioas-map's queues, and tells when a run's groups are all answered.
        self.control_path = tmp / "control.sock"
        brokered = any(run.brokered for run in runs)
        self.peers: dict[str, subprocess.Popen] = {}
        queues = []
        fds = []
        for run in runs:
            for name, queue in zip(run.names, run.queues):
                queue_settings = STORM if run.scenario == "storm" else {"policy": run.policy}
                if brokered:  # [defaults] has ioas-map's deadline: this queue keeps its own
                    queue_settings = {"response_deadline": QueueDefaults().response_deadline} | queue_settings
                queues.append("[[queues]]\n" + f'name = "{name}"\nfd = {queue.fd}\n'
                              + "".join(f"{key} = {json.dumps(value)}\n" for key, value in queue_settings.items()))
                fds.append(queue.fd)
        forward_args = []
        for policy in sorted({run.policy for run in runs if run.policy in ("forward", "forward-py")}):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with ours, theirs:
                command = ([tools.peer, str(theirs.fileno()), str(PEER_RECORDS)] if policy == "forward" else
                           [sys.executable, "-m", "iopfd_dev.bench.peer", str(theirs.fileno()), str(PEER_RECORDS)])
                self.peers[policy] = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE,
                                                      text=True)
                forward_args += ["--forward-fd", f"{os.dup(ours.fileno())}:{policy}:{PEER_RECORDS}"]
                fds.append(int(forward_args[-1].split(":")[0]))
        tables = POLICY_TABLES
        if brokered:
            assert backing is not None
            tables = IOAS_MAP_TABLE.format(deadline=IOAS_MAP_DEADLINE, ioas_id=BROKERED_IOAS_ID, window=WINDOW,
                                           page=PAGE, length=os.fstat(backing).st_size,
                                           backing=f"/proc/{os.getpid()}/fd/{backing}") + tables
        config = tmp / "iopfd.toml"
        config.write_text(tables + "\n".join(queues))
        print(f"[bench] starting iopfd run with {len(queues)} queues ...", file=sys.stderr, flush=True)
        try:
            self.daemon = spawn_daemon(
                tmp, fds, "--config", str(config), *forward_args, "--metrics-address", "127.0.0.1:0",
                program=("-m", "iopfd_dev.bench.recorder", str(self.report_path), "run"),
                env={"IOPFD_CONTROL__PATH": str(self.control_path), "IOPFD_WATCH_DEVICES": "false",
                     "IOPFD_RUNTIME_DIR": str(tmp), "IOPFD_LOG_LEVEL": "error",
                     TRACED_ENV: ",".join(name for run in runs if run.scenario in ("seed", "steady")
                                          for name in run.names)}
                | ({PROFILE_ENV: profile} if profile else {}))
        finally:
            for fd in fds[len(queues):]:
                os.close(fd)  # the daemon's copies of the channel ends are its own now
        self.proc = self.daemon.proc

    def broker(self, run: Run, stack: ExitStack) -> None:
        """Have iopfd open ``run``'s queue and the iommufd it maps into, and build the paging rig in it."""
        with Client(str(self.control_path)) as client:
            fd, fault_id = client.broker(run.names[0], policy=run.policy)
        run.ctx = stack.enter_context(Iommufd(fd))
        rig = stack.enter_context(PagingMockSetup(run.ctx, fault_id))
        if rig.ioas.id != BROKERED_IOAS_ID:
            raise RuntimeError(f"the brokered iommufd's IOAS is {rig.ioas.id}, not the {BROKERED_IOAS_ID} the "
                               "ioas-map policy maps into")
        run.rigs.append(rig)

    def wait_answered(self, run: Run, timeout: float = 600) -> bool:
        """Until iopfd has answered every group of ``run``; True if it had at the first look. Asks every
        0.2 s (each status request is iopfd CPU time in the run's figure)."""
        deadline = time.monotonic() + timeout
        first_look = True
        with Client(str(self.control_path)) as client:
            while True:
                answered = sum(sum(q["outcomes"].values()) for q in client.status()["queues"] if q["name"] in run.names)
                if answered >= run.groups:
                    return first_look
                if time.monotonic() > deadline:
                    raise RuntimeError(f"iopfd answered {answered} of {run.groups} groups of {run.name} in {timeout} s")
                first_look = False
                time.sleep(0.2)

    def peer_pid(self, policy: str | None) -> int | None:
        peer = self.peers.get(policy or "")
        return peer.pid if peer else None

    def stop(self) -> dict:
        # The report lists when every group was answered: a few minutes of JSON for millions of
        # groups in the TCG guest.
        print("[bench] stopping iopfd (it writes its report) ...", file=sys.stderr, flush=True)
        try:
            status = self.daemon.terminate(timeout=STOP_TIMEOUT)
            if status != 0:
                raise RuntimeError(f"iopfd exited with {status}: {self.daemon.output()[-2000:]}")
        finally:
            self.daemon.close()
        for policy, peer in self.peers.items():  # iopfd closed their channels: they end on their own
            peer.communicate(timeout=60)
            if peer.returncode != 0:
                raise RuntimeError(f"the {policy} peer exited with {peer.returncode}")
        return json.loads(self.report_path.read_text())


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, all threads, user and system (to the clock tick)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, so a burst is queued before it reads any of it.
    The stop is awaited: a daemon still running when the first faults come would start their clock
    (the first readiness) before the rest are even raised."""
    os.kill(pid, signal.SIGSTOP)
    while _state(pid) != "T":
        time.sleep(0.001)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def execute(run: Run, ctx: Iommufd, tools: Tools, daemon: Daemon | None, tmp: Path,
            backing: int | None = None) -> None:
    counts = shares(run.groups, len(run.rigs))
    log = tmp / f"{run.name}.answers"
    ctx = run.ctx or ctx
    if run.responder == "iopfd":
        assert daemon is not None  # run_bench starts one when there are iopfd runs
        pid = daemon.proc.pid
    else:
        if run.responder == C_MAP:
            assert backing is not None
            command, fds = mapper_command(tools, ctx, run.rigs[0], run.queues[0], backing), [ctx.fd, backing]
        else:
            answers_log = ["-l", str(log)] if run.scenario in ("seed", "steady") else []
            command, fds = [tools.responder, *C_LOOPS[run.responder], *answers_log], []
        loop = subprocess.Popen([*command, *(str(q.fd) for q in run.queues if run.responder != C_MAP)],
                                pass_fds=[*fds, *(q.fd for q in run.queues)], stdout=subprocess.PIPE, text=True)
        pid = loop.pid
    peer = daemon.peer_pid(run.policy) if daemon and run.responder == "iopfd" else None
    offered: dict | None = None
    if run.scenario in ("burst", "storm", "multi", WARM_UP):
        # Queue the whole burst first, then let the responder at it: its own clock measures how
        # fast it drains, not how fast the trigger raises faults.
        with stopped(pid):
            for rig, count in zip(run.rigs, counts):
                trigger(tools, ctx, rig, count, first_addr=run.first_addr)
            cpu, peer_cpu = cpu_seconds(pid), cpu_seconds(peer) if peer else 0.0
    else:
        cpu, peer_cpu = cpu_seconds(pid), cpu_seconds(peer) if peer else 0.0
        raised = tmp / f"{run.name}.raised"
        offered = trigger(tools, ctx, run.rigs[0], run.groups, run.rate, threads=run.threads, log=raised)
        run.raised = _pairs(raised.read_bytes())
    for queue in run.queues:
        _wait_drained(queue, settle=1.5 if run.scenario == "storm" else 0.3)
    cpu_start, cpu = cpu, cpu_seconds(pid) - cpu
    # Every group read is not every group answered: a per-group plug-in may still be deciding, and a
    # brokered queue has no fd here to watch. The next run stops iopfd (SIGSTOP) while it queues its
    # burst, which would hold these groups up.
    if daemon is not None and run.responder == "iopfd" and not daemon.wait_answered(run):
        cpu = cpu_seconds(pid) - cpu_start  # that work counts (and the status requests, a little)
    run.result = result = Result(
        run.scenario, run.responder, run.groups, 0, 0.0, cpu, peak_rss_kb(pid), policy=run.policy,
        queues=len(run.queues), threads=run.threads if run.scenario == "seed" else None,
        offered_rate=run.groups / offered["seconds"] if run.scenario == "steady" and offered is not None else None,
        peer_cpu_seconds=cpu_seconds(peer) - peer_cpu if peer else None)
    if run.responder != "iopfd":
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=60)
        figures = json.loads(out)
        per_fd = figures["fds"]
        result.answered = sum(f["groups"] for f in per_fd)
        result.seconds = max(f["last_write"] for f in per_fd) - min(f["first_read"] for f in per_fd)
        result.cpu_seconds = figures["cpu_seconds"]  # the loop's own accounting: exact, and only this run
        result.maxrss_kb = figures["maxrss_kb"]
        if figures.get("map_failures") or figures.get("outside_window"):
            raise RuntimeError(f"the C map loop could not map {figures['map_failures']} faulting pages "
                               f"({figures['outside_window']} outside its window)")
        if run.responder == C_MAP:
            result.outcomes = {"success": result.answered}
        if run.scenario == "seed":
            result.worst = max(_from_raise(run.raised, _pairs(log.read_bytes())))
        elif run.scenario == "steady":
            result.from_raise = percentiles(_from_raise(run.raised, _pairs(log.read_bytes())))


def finish_iopfd(run: Run, report: dict) -> None:
    """The run's figures from the daemon's report: its queues' counts, clocks and latency."""
    queues = [report["queues"][name] for name in run.names]
    r = run.measured
    r.answered = sum(sum(q["outcomes"].values()) for q in queues)
    r.seconds = max(q["last_write"] for q in queues) - min(q["first_read"] for q in queues)
    r.outcomes = {k: sum(q["outcomes"][k] for q in queues) for k in queues[0]["outcomes"]}
    r.shed = r.outcomes["shed"]
    r.late = sum(q["late"] for q in queues)
    if len(queues) == 1:
        r.latency = queues[0]["latency"]
    if run.scenario == "seed":
        r.worst = max(_from_raise(run.raised, [(addr, at) for addr, at in queues[0]["answered_at"]]))
    elif run.scenario == "steady":
        r.from_raise = percentiles(_from_raise(run.raised, [(addr, at) for addr, at in queues[0]["answered_at"]]))
    if run.paging and r.outcomes["success"] != run.groups:
        raise RuntimeError(f"ioas-map answered {r.outcomes['success']} of {run.groups} groups SUCCESS ({r.outcomes}): "
                           "its CPU per group would not compare with the C map loop's, which maps every one")


def check_answered(run: Run) -> None:
    r = run.measured
    if r.answered != run.groups:
        raise RuntimeError(f"{run.scenario} {r.label}: {r.answered} of {run.groups} groups answered")


def median_of_repeats(runs: list[Run]) -> list[Result]:
    """One result per (scenario, rate or threads, responder, policy): the repeat with the median groups/s."""
    groups: dict[tuple, list[Result]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.rate, run.threads, run.responder, run.policy), []).append(run.measured)
    results = []
    for repeats in groups.values():
        median = sorted(repeats, key=lambda r: r.groups_per_second)[len(repeats) // 2]
        median.runs = [round(r.groups_per_second) for r in repeats]
        results.append(median)
    return results


def _pairs(data: bytes) -> list[tuple[int, float]]:
    """The (u64 address, double time) pairs of a trigger's or C loop's log."""
    import struct

    return list(struct.iter_unpack("<Qd", data))


def _from_raise(raised: list[tuple[int, float]], answered: list[tuple[int, float]]) -> list[float]:
    """Each fault's time from its raising (the trigger's clock) to its group's answer, in order."""
    when = dict(answered)
    missing = [addr for addr, _ in raised if addr not in when]
    if missing:
        raise RuntimeError(f"{len(missing)} raised faults have no answer, e.g. address {missing[0]:#x}")
    return sorted(when[addr] - at for addr, at in raised)


def trigger_argument(rig: FaultingMockSetup, first_addr: int = FIRST_ADDR) -> tuple[int, bytes, int, int]:
    """TRIGGER_IOPF's request and argument for the rig's device (a read at ``first_addr``), and where
    the address and the PASID lie in the argument."""
    request, arg = rig.device.trigger_iopf_ioctl(addr=first_addr, perm=PERM_READ)
    return (request, arg, ffi.offsetof("struct iommu_test_cmd", "trigger_iopf", "addr"),
            ffi.offsetof("struct iommu_test_cmd", "trigger_iopf", "pasid"))


def start_trigger(tools: Tools, ctx: Iommufd, rig: FaultingMockSetup, count: int, rate: float = 0, *,
                  threads: int = 1, log: Path | None = None, first_addr: int = FIRST_ADDR) -> subprocess.Popen:
    """Start raising ``count`` single-record faults on ``rig``'s device, each at its own page, at
    ``rate`` per second (0: at once), from ``threads`` threads (each at its own PASID); with ``log``,
    when each was raised goes there. Its stdout will be one JSON line of figures."""
    request, arg, addr_offset, pasid_offset = trigger_argument(rig, first_addr)
    options = ["-a", str(addr_offset)]
    if threads > 1:
        options += ["-t", str(threads), "-p", str(pasid_offset)]
    if log is not None:
        options += ["-l", str(log)]
    return subprocess.Popen([tools.trigger, *options, str(ctx.fd), hex(request), arg.hex(), str(count), repr(rate)],
                            pass_fds=[ctx.fd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_trigger(started: subprocess.Popen, timeout: float = 3600) -> dict:
    """Wait for a trigger; returns its figures (``seconds``, and ``max_behind``, its worst lag behind the rate)."""
    out, err = started.communicate(timeout=timeout)
    if started.returncode != 0:
        raise RuntimeError(f"the fault trigger failed: {err.strip()}")
    return json.loads(out)


def trigger(tools: Tools, ctx: Iommufd, rig: FaultingMockSetup, count: int, rate: float = 0, **options) -> dict:
    return finish_trigger(start_trigger(tools, ctx, rig, count, rate, **options))


def mapper_argument(ioas_id: int) -> tuple[int, bytes, int, int]:
    """IOMMU_IOAS_MAP's request and argument for the C map loop (FIXED_IOVA, read/write, one PAGE into
    IOAS ``ioas_id``; built with iopfd's binding), and where the user address and the IOVA lie in it."""
    cmd = new("struct iommu_ioas_map", ioas_id=ioas_id, length=PAGE, flags=lib.IOMMU_IOAS_MAP_FIXED_IOVA
              | lib.IOMMU_IOAS_MAP_READABLE | lib.IOMMU_IOAS_MAP_WRITEABLE)
    return (lib.IOMMU_IOAS_MAP, bytes(ffi.buffer(cmd)), ffi.offsetof("struct iommu_ioas_map", "user_va"),
            ffi.offsetof("struct iommu_ioas_map", "iova"))


def mapper_command(tools: Tools, ctx: Iommufd, rig: FaultingMockSetup, queue: FaultQueue, backing: int,
                   records: int = 256) -> Sequence[str]:
    """The C map loop on ``queue``, mapping from ``backing`` into ``rig``'s IOAS at WINDOW."""
    request, arg, va_offset, iova_offset = mapper_argument(rig.ioas.id)
    return [tools.mapper, "-r", str(records), str(ctx.fd), str(queue.fd), hex(request), arg.hex(), str(va_offset),
            str(iova_offset), str(backing), hex(WINDOW), hex(os.fstat(backing).st_size), str(PAGE)]


def _wait_drained(queue: FaultQueue, settle: float = 0.3, timeout: float = 600) -> None:
    """Until the responder has read everything and had ``settle`` seconds to write it back."""
    deadline = time.monotonic() + timeout
    while select.select([queue.fd], [], [], 0)[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the responder stopped reading")
        time.sleep(0.05)
    time.sleep(settle)


def startup_seconds(runs: int = 5) -> float:
    """Median time from exec to READY=1 of ``iopfd run`` with the default config (metrics endpoint,
    device watching, crash recovery on) and a control socket as its only source of queues."""
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp:
            started = time.monotonic()
            daemon = spawn_daemon(Path(tmp), (), "--metrics-address", "127.0.0.1:0",
                                  env={"IOPFD_CONTROL__PATH": f"{tmp}/control.sock", "IOPFD_RUNTIME_DIR": tmp})
            times.append(time.monotonic() - started)
            try:
                daemon.terminate()
            finally:
                daemon.close()
    return sorted(times)[len(times) // 2]
