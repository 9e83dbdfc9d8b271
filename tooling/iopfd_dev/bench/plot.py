"""The bench's chart: iopfd's latency CDF per scenario, and throughput by scenario against the C floor."""

from __future__ import annotations

from pathlib import Path

from iopfd_dev.bench.run import Result

MISSING = ("drawing the chart needs matplotlib, which is not installed: run `uv sync` in a checkout "
           "(a dependency of iopfd-dev)")


def draw(results: list[Result], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"iopfd-dev bench: {MISSING}") from None
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, (cdf, bars) = pyplot.subplots(1, 2, figsize=(13, 5))
    for r in results:
        if r.latency_cdf:
            label = f"{r.scenario} ({r.source})" + (f" {r.offered_rate / 1000:.0f}k/s" if r.scenario == "steady" else "")
            cdf.plot([max(x, 1e-6) * 1e3 for x in r.latency_cdf], [i / 100 for i in range(len(r.latency_cdf))],
                     label=label, linestyle="--" if r.source == "emulated" else "-")
    cdf.set_xscale("log")
    cdf.set_xlabel("latency, read() to write() (ms, log scale)")
    cdf.set_ylabel("fraction of groups")
    cdf.set_title("iopfd response latency (CDF)")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize="small", loc="lower right")

    labels = list(dict.fromkeys(f"{r.scenario}\n{r.source}" for r in results))
    width = 0.4
    for offset, responder in ((-width / 2, "c"), (width / 2, "iopfd")):
        values = {f"{r.scenario}\n{r.source}": r.groups_per_second for r in results if r.responder == responder}
        positions = [i + offset for i, label in enumerate(labels) if label in values]
        bars.bar(positions, [values[label] for label in labels if label in values], width,
                 label="C floor" if responder == "c" else "iopfd")
    bars.set_xticks(range(len(labels)), labels, fontsize="small")
    bars.set_yscale("log")
    bars.set_ylabel("groups answered per second (log scale)")
    bars.set_title("throughput by scenario")
    bars.grid(True, axis="y", which="both", alpha=0.3)
    bars.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
