"""``iopfd bench``: build the C floor, boot the lab (unless --here), run the scenarios, print a table
and write JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from iopfd.lab.guest import GUEST_ENV

SOURCE = Path(__file__).parents[2] / "bench" / "responder.c"
SCENARIOS = ("burst", "steady", "storm")


def build_responder(directory: Path) -> Path:
    """Compile bench/responder.c (cached by its content)."""
    import hashlib

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = directory / f"responder-{digest}"
    if not binary.exists():
        directory.mkdir(parents=True, exist_ok=True)
        print(f"[bench] compiling {SOURCE.name}", file=sys.stderr)
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def main(*, here: bool, kernel: str, scenarios: list[str], groups: int, rate: float, out: str | None) -> int:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iopfd" / "bench"
    if not here and not os.environ.get(GUEST_ENV):
        from iopfd.lab import vm
        from iopfd.lab.errors import LabError

        binary = build_responder(cache)  # on the host: the guest sees it read-only
        argv = [sys.executable, "-m", "iopfd", "bench", "--here", "--responder", str(binary), "--groups", str(groups),
                "--rate", str(rate), "--out", str(Path(out or "bench-results.json").resolve()), *scenarios]
        try:
            return vm.run(argv, kernel=kernel)
        except LabError as exc:
            print(f"iopfd bench: {exc}", file=sys.stderr)
            return 1
    return run_here(scenarios, groups, rate, out, os.environ.get("IOPFD_BENCH_RESPONDER") or str(build_responder(cache)))


def run_here(scenarios: list[str], groups: int, rate: float, out: str | None, responder: str) -> int:
    from iopfd.bench.run import run_scenario

    results = []
    for scenario in scenarios:
        for kind in ("c", "iopfd") if scenario != "storm" else ("iopfd",):
            print(f"[bench] {scenario}: {kind} ...", file=sys.stderr, flush=True)
            results.append(run_scenario(scenario, kind, groups, responder,
                                        rate=rate if scenario == "steady" else None))
    print(table(results))
    if out:
        Path(out).write_text(json.dumps({"kernel": os.uname().release, "cpus": os.cpu_count(),
                                         "results": [r.as_dict() for r in results]}, indent=2))
        print(f"[bench] results: {out}", file=sys.stderr)
    return 0


def table(results) -> str:
    lines = [f"{'scenario':<8} {'responder':<9} {'groups':>8} {'groups/s':>10} {'cpu µs/grp':>10} {'rss MB':>7} "
             f"{'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7} {'late':>5} {'shed':>6}"]
    for r in results:
        lat = r.latency or {}
        ms = [f"{lat[k] * 1e3:.2f}" if lat.get(k) is not None else "-" for k in ("p50", "p99", "p99.9", "p100")]
        lines.append(f"{r.scenario:<8} {r.responder:<9} {r.answered:>8} {r.groups_per_second:>10.0f} "
                     f"{r.cpu_us_per_group:>10.1f} {r.maxrss_kb / 1024:>7.1f} {ms[0]:>7} {ms[1]:>7} {ms[2]:>8} "
                     f"{ms[3]:>7} {r.late if r.late is not None else '-':>5} {r.shed if r.shed is not None else '-':>6}")
    by = {(r.scenario, r.responder): r for r in results}
    for scenario in ("burst", "steady"):
        c, py = by.get((scenario, "c")), by.get((scenario, "iopfd"))
        if c and py and c.groups_per_second and c.cpu_us_per_group:
            lines.append(f"{scenario}: iopfd/C throughput {py.groups_per_second / c.groups_per_second:.2f}, "
                         f"CPU per group {py.cpu_us_per_group / c.cpu_us_per_group:.2f}x")
    return "\n".join(lines)
