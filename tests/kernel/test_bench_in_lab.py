"""``iopfd-dev bench`` in the lab: the C floor and iopfd both answer every group in every scenario, and
the CI guard (a short burst and storm) holds: iopfd at >= 0.4 of the C floor's throughput, no storm
group late."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iopfd_dev.bench.cli import build_tools

pytestmark = [pytest.mark.kernel, pytest.mark.guest, pytest.mark.timeout(900)]  # several daemon starts each


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    tools = build_tools(tmp_path)
    return subprocess.run([sys.executable, "-m", "iopfd_dev", "bench", "--here", "--no-emulated",
                           "--tools", f"{tools.responder}:{tools.trigger}", *args],
                          capture_output=True, text=True, timeout=900)


def test_bench_runs_every_scenario_and_leaves_nothing_open(tmp_path):
    out = tmp_path / "bench.json"
    result = _bench(tmp_path, "--groups", "3000", "--rate", "2000", "--repeat", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    results = {(r["scenario"], r["responder"]): r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {(s, k) for s in ("burst", "steady", "storm", "multi") for k in ("c", "iopfd")}
    assert all(r["answered"] == 3000 and r["groups_per_second"] > 0 for r in results.values())
    assert results[("multi", "c")]["queues"] == results[("multi", "iopfd")]["queues"] == 8
    assert results[("storm", "iopfd")]["late"] == 0
    assert results[("steady", "iopfd")]["latency"]["count"] == 3000
    assert 1500 < results[("steady", "iopfd")]["offered_rate"] < 2100
    assert "burst: iopfd/C throughput" in result.stdout


def test_the_ci_guard_holds(tmp_path):
    """The regression guard: fails when iopfd's burst throughput drops below 0.4 of the C floor's or
    a storm group is answered later than deadline + 50 ms."""
    result = _bench(tmp_path, "--guard", "--out", str(tmp_path / "guard.json"))
    print(result.stdout + result.stderr)
    assert "guard: burst throughput" in result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
