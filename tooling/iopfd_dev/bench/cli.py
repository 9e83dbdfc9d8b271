"""``iopfd-dev bench``: build the C programs, boot the lab on each kernel asked for (unless --here), run
the scenarios for the C loops and for iopfd with each policy, run them on the emulated queue too, then
print the tables, write JSON and draw a PNG.

``--guard`` is the short run CI makes: a burst of the C floor and of iopfd with accept, rules and
forward, and the storm; it fails when a policy falls below its share of the C floor's throughput or
sheds, or when a storm group is answered late.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from iopfd_dev.bench.run import SEED_FAULTS_PER_THREAD, Result
from iopfd_dev.bench.tools import Tools, build_tools
from iopfd_dev.lab.guest import GUEST_ENV

GUARD_GROUPS = 50_000
# The guard's policies and the least share of the C floor's burst throughput each must keep. These
# are regression floors, not the targets (docs/performance.md has both): about two thirds of the
# lowest share measured in CI's lab (accept 0.38-0.56, rules 0.20-0.25, forward 0.17-0.20, 6.12 and
# 7.3, 2026-12-04), as the host is shared and TCG magnifies its noise.
GUARD = {"accept": 0.25, "rules": 0.13, "forward": 0.11}
# Policies that decide whole batches must shed nothing in a burst: what waits for room under
# max_pending is parked, not shed (iopfd/engine/queue.py). The guard reports forward's late groups
# without failing on them.
MUST_NOT_SHED = ("accept", "rules", "forward")
# A burst drains in well under a second, so one stall of the shared host moves its figure a lot:
# the throughput scenarios (burst, multi) run this often, and the run with the median groups/s is reported.
REPEATS = 3


def main(*, here: bool, kernels: list[str], scenarios: list[str], policies: list[str], groups: int,
         out: str | None, png: str | None, emulated: bool, guard: bool, tools: Tools | None = None,
         repeat: int = REPEATS, seed_faults: int = SEED_FAULTS_PER_THREAD, profile: str | None = None) -> int:
    if tools is None:  # built on the host when the lab runs, and passed in: the guest sees the cache read-only
        tools = build_tools(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iopfd" / "bench")
    if guard:
        scenarios, policies, groups = ["burst", "storm"], list(GUARD), min(groups, GUARD_GROUPS)
    out_path = Path(out or "bench-results.json").resolve()
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    results: list[Result] = []
    if here or os.environ.get(GUEST_ENV):
        from iopfd_dev.bench.run import run_bench

        results = run_bench(scenarios, policies, groups, tools, repeat, seed_faults,
                            profile=str(Path(profile).resolve()) if profile else None)
        if profile:
            print_profile(Path(profile))
    else:
        for kernel in kernels:
            kernel_profile = None
            if profile:
                kernel_profile = Path(profile if len(kernels) == 1 else f"{profile}-{kernel}").resolve()
            status = _in_lab(kernel, scenarios, policies, groups, tools, repeat, seed_faults, guard, results,
                             kernel_profile)
            if status:
                return status
            if kernel_profile:
                print(f"[bench] profile of iopfd on {kernel}: {kernel_profile}", file=sys.stderr)
                print_profile(kernel_profile)
    if emulated and not guard:
        results += run_emulated([s for s in scenarios if s != "seed"], groups)
        from iopfd_dev.bench.run import startup_seconds

        machine["startup_seconds"] = startup_seconds()
        print(f"[bench] start-up to READY=1 on this machine: {machine['startup_seconds']:.2f} s (median of 5)",
              file=sys.stderr)
    print(tables(results))
    out_path.write_text(json.dumps(machine | {"results": [r.as_dict() for r in results]}, indent=2))
    print(f"[bench] results: {out_path}", file=sys.stderr)
    if png or (not here and not guard):
        from iopfd_dev.bench.plot import draw

        path = Path(png) if png else out_path.with_suffix(".png")
        draw(results, path)
        print(f"[bench] chart: {path}", file=sys.stderr)
    return check_guard(results) if guard else 0


def _in_lab(kernel: str, scenarios: list[str], policies: list[str], groups: int, tools: Tools, repeat: int,
            seed_faults: int, guard: bool, results: list[Result], profile: Path | None = None) -> int:
    """One lab boot on ``kernel`` running the kernel scenarios; its results are added to ``results``."""
    import tempfile

    from iopfd_dev.lab import vm
    from iopfd_dev.lab.errors import LabError

    with tempfile.TemporaryDirectory(prefix="iopfd-bench-") as shared:  # writable in the guest
        guest_out = Path(shared) / "results.json"
        guest_profile = Path(shared) / "iopfd.pstats"
        argv = [sys.executable, "-m", "iopfd_dev", "bench", "--here", "--tools",
                tools.spec, "--groups", str(groups), "--repeat", str(repeat),
                "--seed-faults", str(seed_faults), "--policies", ",".join(policies), "--out", str(guest_out),
                "--no-emulated", *(["--profile", str(guest_profile)] if profile else []),
                *(["--guard"] if guard else []), *scenarios]
        try:
            status = vm.run(argv, kernel=kernel, shared_dir=Path(shared))
        except LabError as exc:
            print(f"iopfd-dev bench: {exc}", file=sys.stderr)
            return 1
        if status not in (0, 1) or not guest_out.exists():
            return status or 1
        results += [Result.from_dict(r) for r in json.loads(guest_out.read_text())["results"]]
        if profile:
            if not guest_profile.exists():
                print(f"iopfd-dev bench: the guest wrote no profile ({guest_profile})", file=sys.stderr)
                return 1
            shutil.copyfile(guest_profile, profile)
        return 0


def print_profile(path: Path, rows: int = 25) -> None:
    """The functions that cost iopfd most CPU time of their own."""
    import pstats

    pstats.Stats(str(path), stream=sys.stderr).sort_stats("tottime").print_stats(rows)


def run_emulated(scenarios: list[str], groups: int) -> list[Result]:
    from iopfd_dev.bench import emulated
    from iopfd_dev.bench.run import STEADY_RATES

    results = []
    for scenario in scenarios:
        print(f"[bench] {scenario}: iopfd on the emulated queue ...", file=sys.stderr, flush=True)
        if scenario == "steady":
            results += [emulated.run_scenario(scenario, int(rate * 2), rate=rate) for rate in STEADY_RATES]
        else:
            results.append(emulated.run_scenario(scenario, groups))
    return results


def check_guard(results: list[Result]) -> int:
    failed = 0
    for kernel in dict.fromkeys(r.kernel for r in results if r.source == "kernel"):
        burst = {r.label: r for r in results if r.scenario == "burst" and r.kernel == kernel}
        floor = burst["c"].groups_per_second
        for policy, share in GUARD.items():
            r = burst[f"iopfd {policy}"]
            ratio = r.groups_per_second / floor
            ok = ratio >= share and not (r.shed and policy in MUST_NOT_SHED)
            print(f"[bench] guard {kernel}: burst {policy} {ratio:.2f} of the C floor (must be >= {share}), "
                  f"shed {r.shed}{' (must be 0)' if policy in MUST_NOT_SHED else f', late {r.late}'}: "
                  f"{'ok' if ok else 'FAILED'}", file=sys.stderr)
            failed |= not ok
        storm = next(r for r in results if r.scenario == "storm" and r.kernel == kernel)
        print(f"[bench] guard {kernel}: storm groups past deadline + 50 ms: {storm.late} (must be 0)", file=sys.stderr)
        failed |= storm.late != 0
    return int(failed)


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1e3:.2f}" if seconds is not None else "-"


def tables(results: list[Result]) -> str:
    """The issue's table per kernel (burst), every run, one table per policy, and the seed rows."""
    parts = []
    for kernel in dict.fromkeys(r.kernel for r in results):
        mine = [r for r in results if r.kernel == kernel]
        parts += [f"== {kernel} ==", issue_table(mine), runs_table(mine), steady_table(mine), seed_table(mine)]
    return "\n\n".join(p for p in parts if p)


# (label, text, the C loop its "vs C" columns compare with): ioas-map maps every page it answers, so it
# compares with the C loop that maps too.
ISSUE_ROWS = (("c", "C loop (poll, read 256 records, one write per read)", "c"),
              ("c-qemu", "C loop as QEMU's PRQ series reads (100 records per read, one write() per group)", "c"),
              ("iopfd accept", "iopfd accept", "c"),
              ("iopfd reject", "iopfd reject", "c"),
              ("iopfd rules", "iopfd rules (accept below 0x8000_0000 and read/write, else reject)", "c"),
              ("iopfd plugin", "iopfd entry-point plug-in, decide returns SUCCESS at once", "c"),
              ("iopfd forward", "iopfd forward, C peer answering at once", "c"),
              ("iopfd forward-py", "iopfd forward, Python client's batch API", "c"),
              ("c-map", "C map loop (read 256 records, one IOMMU_IOAS_MAP per fault, one write per read); "
                        "vs itself", "c-map"),
              ("iopfd ioas-map", "iopfd ioas-map (one IOMMU_IOAS_MAP per run of consecutive pages); vs the C map "
                                 "loop", "c-map"))


def issue_table(results: list[Result]) -> str:
    """The burst as issue 13 tabulates it: groups/s delivered, CPU µs per group, CPU and rate vs the C
    loop (for ioas-map, the C map loop)."""
    burst = {r.label: r for r in results if r.scenario == "burst" and r.source == "kernel"}
    if "c" not in burst and "c-map" not in burst:
        return ""
    lines = ["| responder | groups/s delivered | CPU µs per group | CPU vs C | rate vs C |", "|---|---|---|---|---|"]
    for label, text, baseline in ISSUE_ROWS:
        r, floor = burst.get(label), burst.get(baseline)
        if r is None or floor is None:
            continue
        peer = f" (+ peer {r.peer_cpu_seconds / r.answered * 1e6:.1f})" if r.peer_cpu_seconds is not None else ""
        lines.append(f"| {text} | {r.groups_per_second:,.0f} | {r.cpu_us_per_group:.2f}{peer} | "
                     f"{r.cpu_us_per_group / floor.cpu_us_per_group:.2f}× | "
                     f"{r.groups_per_second / floor.groups_per_second:.2f} |")
    return "\n".join(lines)


def runs_table(results: list[Result]) -> str:
    lines = [f"{'scenario':<12} {'source':<8} {'responder':<17} {'groups':>8} {'groups/s':>10} {'cpu µs/grp':>10} "
             f"{'rss MB':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7} {'late':>5} {'shed':>6} "
             f"{'success':>8}"]
    for r in sorted((r for r in results if r.scenario != "seed"), key=lambda r: (r.label, r.scenario)):
        lat = r.latency or {}
        ms = [_ms(lat.get(k)) for k in ("p50", "p99", "p99.9", "p100")]
        success = r.outcomes["success"] if r.outcomes else "-"
        lines.append(f"{r.scenario_label:<12} {r.source:<8} {r.label:<17} {r.answered:>8} {r.groups_per_second:>10.0f} "
                     f"{r.cpu_us_per_group:>10.2f} {r.maxrss_kb / 1024:>7.1f} {ms[0]:>7} {ms[1]:>7} {ms[2]:>8} "
                     f"{ms[3]:>7} {r.late if r.late is not None else '-':>5} "
                     f"{r.shed if r.shed is not None else '-':>6} {success:>8}")
    return "\n".join(lines)


def steady_table(results: list[Result]) -> str:
    rows = [r for r in results if r.scenario == "steady" and r.from_raise]
    if not rows:
        return ""
    lines = ["steady: from raising a fault (the trigger's clock) to the write of its answer, C loop and iopfd alike",
             f"{'responder':<17} {'offered':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}"]
    for r in sorted(rows, key=lambda r: (r.label, r.offered_rate or 0.0)):
        assert r.from_raise is not None
        ms = [_ms(r.from_raise[k]) for k in ("p50", "p99", "p100")]
        lines.append(f"{r.label:<17} {r.scenario_label.split()[-1]:>8} {ms[0]:>7} {ms[1]:>7} {ms[2]:>7}")
    return "\n".join(lines)


def seed_table(results: list[Result]) -> str:
    rows = [r for r in results if r.scenario == "seed"]
    if not rows:
        return ""
    lines = ["seed: threads raising faults at once (200 each); worst = longest time from raising a fault to its answer",
             f"{'responder':<17} {'threads':>7} {'faults':>7} {'groups/s':>10} {'worst ms':>9} {'success':>8}"]
    for r in sorted(rows, key=lambda r: (r.label, r.threads)):
        success = r.outcomes["success"] if r.outcomes else "-"
        lines.append(f"{r.label:<17} {r.threads:>7} {r.answered:>7} {r.groups_per_second:>10.0f} {_ms(r.worst):>9} "
                     f"{success:>8}")
    return "\n".join(lines)
