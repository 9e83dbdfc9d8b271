"""``iopfd bench`` in the lab: the C floor and iopfd both answer every group; the storm is on time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iopfd.bench.cli import build_responder

pytestmark = [pytest.mark.kernel, pytest.mark.guest]


def test_bench_runs_every_scenario_and_leaves_nothing_open(tmp_path):
    responder = build_responder(tmp_path)
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "iopfd", "bench", "--here", "--responder", str(responder),
                             "--groups", "3000", "--rate", "2000", "--out", str(out), "burst", "steady", "storm"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = {(r["scenario"], r["responder"]): r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {("burst", "c"), ("burst", "iopfd"), ("steady", "c"), ("steady", "iopfd"), ("storm", "iopfd")}
    assert all(r["answered"] == 3000 and r["groups_per_second"] > 0 for r in results.values())
    assert results[("storm", "iopfd")]["late"] == 0
    assert results[("steady", "iopfd")]["latency"]["count"] == 3000
    assert "burst: iopfd/C throughput" in result.stdout
