"""``iopfd-dev bench`` off the lab: the scenarios on the emulated queue (each in a process of its own, the
daemon's Server inside), the chart, and the CI guard's verdict."""

from __future__ import annotations

import pytest

from iopfd_dev.bench import emulated
from iopfd_dev.bench.cli import check_guard, table
from iopfd_dev.bench.plot import draw
from iopfd_dev.bench.run import MULTI_QUEUES, Result, shares


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    return {scenario: emulated.run_scenario(scenario, 3000, rate=5000 if scenario == "steady" else 0)
            for scenario in ("burst", "steady", "storm", "multi")}


def test_every_scenario_answers_every_group_on_the_emulated_queue(results):
    for scenario, r in results.items():
        assert (r.source, r.responder, r.answered, r.late) == ("emulated", "iopfd", 3000, 0), scenario
        assert r.latency["count"] == 3000 and len(r.latency_cdf) == 101
        assert r.latency_cdf == sorted(r.latency_cdf) and r.latency_cdf[-1] == r.latency["p100"]
        assert r.groups_per_second > 0 and r.cpu_seconds > 0 and r.maxrss_kb > 0
    assert results["multi"].queues == MULTI_QUEUES and results["burst"].queues == 1
    # The storm's policy takes 5 ms per group: no group can be answered sooner (a lower bound, not a timing).
    assert results["storm"].latency_cdf[0] >= 0.005
    assert "storm" in table(list(results.values()))


def test_the_chart_is_a_png(results, tmp_path):
    path = tmp_path / "bench.png"
    draw(list(results.values()), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _result(scenario: str, responder: str, seconds: float, late: int | None = None) -> Result:
    return Result(scenario, responder, 1000, 1000, seconds, 0.1, 1000, late=late)


@pytest.mark.parametrize(("iopfd_seconds", "late", "verdict"), [(2.0, 0, 0), (2.6, 0, 1), (2.0, 1, 1)])
def test_the_guard_fails_below_0_4_of_the_c_floor_or_on_a_late_storm_group(iopfd_seconds, late, verdict):
    results = [_result("burst", "c", 1.0), _result("burst", "iopfd", iopfd_seconds),
               _result("storm", "iopfd", 5.0, late=late)]
    assert check_guard(results) == verdict


def test_groups_are_shared_evenly_over_queues():
    assert shares(10, 3) == [4, 3, 3] and sum(shares(200_000, MULTI_QUEUES)) == 200_000


def test_start_up_is_timed_to_ready_1():
    from iopfd_dev.bench.run import startup_seconds

    assert startup_seconds(runs=1) > 0  # the figure itself is the bench's; a unit test must not time it
