"""``iopfd-dev bench`` off the lab: the scenarios on the emulated queue (each in a process of its own, the
daemon's Server inside), the plan of kernel runs, the tables, the chart, and the CI guard's verdict."""

from __future__ import annotations

import pytest

from iopfd_dev.bench import emulated
from iopfd_dev.bench.cli import GUARD, check_guard, issue_table, tables
from iopfd_dev.bench.plot import draw
from iopfd_dev.bench.recorder import percentiles
from iopfd_dev.bench.run import (
    C_MAP,
    MULTI_QUEUES,
    PAGE,
    PAGING_POLICY,
    SEED_THREADS,
    WARM_UP,
    WINDOW,
    Result,
    _from_raise,
    mapper_argument,
    plan,
    shares,
)
from iopfd_dev.bench.tools import Tools


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    return {scenario: emulated.run_scenario(scenario, 3000, rate=5000 if scenario == "steady" else 0)
            for scenario in ("burst", "steady", "storm", "multi")}


def test_every_scenario_answers_every_group_on_the_emulated_queue(results):
    for scenario, r in results.items():
        assert (r.source, r.responder, r.answered, r.late, r.shed) == ("emulated", "iopfd", 3000, 0, 0), scenario
        assert r.latency["count"] == 3000 and r.latency["p50"] <= r.latency["p99"] <= r.latency["p100"]
        assert r.groups_per_second > 0 and r.cpu_seconds > 0 and r.maxrss_kb > 0
        assert r.outcomes["success"] == 3000
    assert results["multi"].queues == MULTI_QUEUES and results["burst"].queues == 1
    assert results["storm"].policy == "slow" and results["burst"].policy == "accept"
    # The storm's policy takes 5 ms per group: no group can be answered sooner (a lower bound, not a timing).
    assert results["storm"].latency["p50"] >= 0.005
    assert "storm" in tables(list(results.values()))


def _result(scenario: str, label: str, seconds: float, *, late: int = 0, shed: int = 0, cpu: float = 0.1,
            **extra) -> Result:
    responder, _, policy = label.partition(" ")
    return Result(scenario, responder, 1000, 1000, seconds, cpu, 1000, policy=policy or None, kernel="7.3",
                  late=late, shed=shed, **extra)


def test_the_chart_is_a_png(results, tmp_path):
    path = tmp_path / "bench.png"
    rows = [*results.values(), _result("burst", "c", 1.0), _result("seed", "c-qemu", 1.0, threads=8, worst=0.01),
            _result("seed", "iopfd rules", 1.0, threads=16, worst=0.02)]
    draw(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _guard_results(**overrides) -> list[Result]:
    rows = {"c": _result("burst", "c", 1.0), **{p: _result("burst", f"iopfd {p}", 1.0) for p in GUARD}}
    rows |= overrides
    return [*rows.values(), _result("storm", "iopfd slow", 5.0)]


@pytest.mark.parametrize(("policy", "seconds", "late", "shed", "verdict"), [
    ("accept", 4.0, 0, 0, 0), ("accept", 4.1, 0, 0, 1), ("rules", 7.6, 0, 0, 0), ("rules", 7.8, 0, 0, 1),
    ("rules", 3.3, 1, 0, 0), ("forward", 9.0, 0, 0, 0), ("forward", 9.2, 0, 0, 1),
    ("accept", 1.0, 0, 1, 1), ("rules", 1.0, 0, 1, 1), ("forward", 1.0, 0, 1, 1), ("forward", 1.0, 1, 0, 0)])
def test_the_guard_holds_each_policy_to_its_share_of_the_c_floor(policy, seconds, late, shed, verdict):
    row = _result("burst", f"iopfd {policy}", seconds, late=late, shed=shed)
    assert check_guard(_guard_results(**{policy: row})) == verdict


def test_the_guard_fails_on_a_late_storm_group():
    rows = _guard_results()
    rows[-1].late = 1
    assert check_guard(rows) == 1


def test_the_issue_table_gives_rate_and_cpu_against_the_c_loop():
    rows = [_result("burst", "c", 1.0, cpu=0.002), _result("burst", "iopfd rules", 2.0, cpu=0.003),
            _result("burst", "iopfd forward", 2.0, cpu=0.004, peer_cpu_seconds=0.001)]
    table = issue_table(rows).splitlines()
    assert table[2] == "| C loop (poll, read 256 records, one write per read) | 1,000 | 2.00 | 1.00× | 1.00 |"
    assert table[3].startswith("| iopfd rules (accept below 0x8000_0000 and read/write, else reject) | 500 | 3.00 | "
                               "1.50× | 0.50 |")
    assert "(+ peer 1.0)" in table[4]


def test_the_plan_alternates_responders_and_gives_seed_rows_their_threads():
    runs = plan(["burst", "steady", "seed"], ["accept", "rules", "forward"], 1000, repeat=2)
    burst = [(r.responder, r.policy) for r in runs if r.scenario == "burst"]
    assert burst == [("c", None), ("c-qemu", None), ("iopfd", "accept"), ("iopfd", "rules"), ("iopfd", "forward")] * 2
    assert sorted({r.rate for r in runs if r.scenario == "steady"}) == [5000, 20000, 50000]
    seed = [r for r in runs if r.scenario == "seed"]
    assert [r.threads for r in seed if r.policy == "rules"] == list(SEED_THREADS)
    assert {(r.responder, r.policy) for r in seed} == {("c-qemu", None), ("iopfd", "rules"), ("iopfd", "forward")}
    assert next(r.groups for r in seed if r.threads == 512) == 102_400


def test_response_time_runs_from_the_raise_and_every_fault_needs_an_answer():
    raised = [(0x1000, 10.0), (0x2000, 10.5), (0x3000, 10.5)]
    delays = _from_raise(raised, [(0x2000, 10.6), (0x1000, 11.2), (0x3000, 10.8)])
    assert delays == pytest.approx([0.1, 0.3, 1.2])  # sorted: seed's worst is the last
    assert percentiles(delays) == pytest.approx({"p50": 0.3, "p99": 0.3, "p99.9": 0.3, "p100": 1.2, "count": 3})
    with pytest.raises(RuntimeError, match=r"2 raised faults have no answer, e\.g\. address 0x2000"):
        _from_raise(raised, [(0x1000, 11.0)])


def test_groups_are_shared_evenly_over_queues():
    assert shares(10, 3) == [4, 3, 3] and sum(shares(200_000, MULTI_QUEUES)) == 200_000


def test_start_up_is_timed_to_ready_1():
    from iopfd_dev.bench.run import startup_seconds

    assert startup_seconds(runs=1) > 0  # the figure itself is the bench's; a unit test must not time it


def test_ioas_map_runs_in_the_burst_only_after_its_c_map_loop_in_the_mock_window_warmed_up_first():
    runs = plan(["burst", "steady", "multi", "seed"], ["accept", PAGING_POLICY], 1000, repeat=2)
    assert (runs[0].scenario, runs[0].responder, runs[0].policy, runs[0].groups) == (WARM_UP, "iopfd", PAGING_POLICY,
                                                                                     1000)
    burst = [(r.responder, r.policy) for r in runs if r.scenario == "burst"]
    assert burst == [("c", None), ("c-qemu", None), ("iopfd", "accept"), (C_MAP, None), ("iopfd", PAGING_POLICY)] * 2
    paging = [r for r in runs[1:] if r.paging]
    assert {r.scenario for r in paging} == {"burst"} and len(paging) == 4
    assert all(r.first_addr == WINDOW and r.groups == 1000 for r in paging)
    # iopfd brokers its ioas-map queue (the policy maps into the queue's iommufd); the C map loop's is the bench's.
    assert [r.brokered for r in paging] == [False, True] * 2
    assert not any(r.paging or r.scenario == WARM_UP for r in plan(["burst"], ["accept"], 1000, repeat=1))
    assert not any(r.paging for r in plan(["steady"], [PAGING_POLICY], 1000, repeat=1))


def test_the_c_map_loop_gets_ioas_map_bytes_from_the_binding():
    from iopfd.iommufd.ioctl import lib
    from iopfd.uapi_ffi import ffi

    request, arg, va_offset, iova_offset = mapper_argument(7)
    assert request == lib.IOMMU_IOAS_MAP and len(arg) == ffi.sizeof("struct iommu_ioas_map")
    cmd = ffi.cast("struct iommu_ioas_map *", ffi.from_buffer(arg))
    assert (cmd.size, cmd.ioas_id, cmd.length, cmd.user_va, cmd.iova) == (len(arg), 7, PAGE, 0, 0)
    assert cmd.flags == lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE | lib.IOMMU_IOAS_MAP_WRITEABLE
    assert (va_offset, iova_offset) == (ffi.offsetof("struct iommu_ioas_map", "user_va"),
                                        ffi.offsetof("struct iommu_ioas_map", "iova"))


def test_the_tools_pass_to_the_guest_as_one_argument():
    tools = Tools("/c/responder", "/c/trigger", "/c/peer", "/c/mapper")
    assert Tools.parse(tools.spec) == tools


def test_the_issue_table_gives_ioas_map_against_the_c_map_loop():
    rows = [_result("burst", "c", 1.0, cpu=0.002), _result("burst", C_MAP, 2.0, cpu=0.010),
            _result("burst", f"iopfd {PAGING_POLICY}", 4.0, cpu=0.015)]
    table = issue_table(rows).splitlines()
    assert table[3].startswith("| C map loop (read 256 records, one IOMMU_IOAS_MAP per fault, one write per read)")
    assert table[3].endswith("| 500 | 10.00 | 1.00× | 1.00 |")
    assert table[4] == ("| iopfd ioas-map (one IOMMU_IOAS_MAP per run of consecutive pages); vs the C map loop | 250 | "
                        "15.00 | 1.50× | 0.50 |")
    # Without the C map loop (6.12, where ioas-map is skipped) there is no ioas-map row to compare.
    assert "ioas-map" not in issue_table(rows[:1] + rows[2:])
