"""The bench's chart, per lab kernel: burst throughput and CPU per group of each responder against the
C floor, steady latency (p99) of each policy by offered rate, and the seed's worst response time by
threads."""

from __future__ import annotations

from pathlib import Path

from iopfd_dev.bench.run import Result

MISSING = ("drawing the chart needs matplotlib, which is not installed: run `uv sync` in a checkout "
           "(it is a dev dependency) or `pip install 'iopfd[bench]'`")


def draw(results: list[Result], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"iopfd-dev bench: {MISSING}") from None
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    kernels = list(dict.fromkeys(r.kernel for r in results if r.source == "kernel")) or ["emulated"]
    figure, axes = pyplot.subplots(len(kernels), 3, figsize=(18, 5 * len(kernels)), squeeze=False)
    for (burst, steady, seed), kernel in zip(axes, kernels):
        mine = [r for r in results if r.kernel == kernel]
        _burst(burst, [r for r in mine if r.scenario == "burst"], kernel)
        _steady(steady, [r for r in mine if r.scenario == "steady" and r.latency], kernel)
        _seed(seed, [r for r in mine if r.scenario == "seed"], kernel)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def _burst(axis, rows: list[Result], kernel: str) -> None:
    labels = [r.label for r in rows]
    axis.bar(range(len(rows)), [r.groups_per_second for r in rows],
             color=["tab:gray" if r.policy is None else "tab:blue" for r in rows])
    floor = next((r for r in rows if r.label == "c"), None)
    for i, r in enumerate(rows):
        if floor is not None and floor.cpu_us_per_group:
            axis.annotate(f"CPU {r.cpu_us_per_group / floor.cpu_us_per_group:.1f}×", (i, r.groups_per_second),
                          ha="center", va="bottom", fontsize="small")
    axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize="small")
    axis.set_ylabel("groups answered per second")
    axis.set_title(f"burst, {kernel}: throughput (CPU per group vs the C floor above each bar)")
    axis.grid(True, axis="y", alpha=0.3)


def _steady(axis, rows: list[Result], kernel: str) -> None:
    for label in dict.fromkeys(r.label for r in rows):
        points = sorted((r.offered_rate or 0.0, (r.latency or {})["p99"]) for r in rows if r.label == label)
        axis.plot([p[0] / 1000 for p in points], [max(p[1], 1e-6) * 1e3 for p in points], marker="o", label=label)
    axis.axhline(1.0, color="red", linestyle=":", label="target for rules at 20k/s: 1 ms")
    axis.set_yscale("log")
    axis.set_xlabel("offered groups/s (thousands)")
    axis.set_ylabel("p99 latency, clock start to write (ms, log)")
    axis.set_title(f"steady, {kernel}: p99 by offered rate")
    axis.grid(True, which="both", alpha=0.3)
    if rows:
        axis.legend(fontsize="small")


def _seed(axis, rows: list[Result], kernel: str) -> None:
    for label in dict.fromkeys(r.label for r in rows):
        points = sorted((r.threads or 0, r.worst or 0.0) for r in rows if r.label == label)
        axis.plot([p[0] for p in points], [p[1] * 1e3 for p in points], marker="o", label=label)
    axis.axhline(1000, color="red", linestyle=":", label="iopfd's deadline: 1 s")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("threads raising faults at once (200 each)")
    axis.set_ylabel("worst time from raising a fault to its answer (ms, log)")
    axis.set_title(f"seed, {kernel}")
    axis.grid(True, which="both", alpha=0.3)
    if rows:
        axis.legend(fontsize="small")
