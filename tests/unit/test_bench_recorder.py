"""The bench's recorder: the engine's observer hook, set from the tooling, sees every read and every
answer written, and ``python -m iopfd_dev.bench.recorder`` runs ``iopfd run`` and writes the report."""

from __future__ import annotations

import asyncio
import json
import pstats

import pytest

from iopfd.engine import Engine, FixedPolicy, Policy, QueueConfig, QueueResponder
from iopfd.iommufd import SUCCESS
from iopfd.iommufd.fault import FaultGroup
from iopfd_dev.bench.recorder import LATE_SLACK, PROFILE_ENV, TRACED_ENV, Recorder
from iopfd_dev.daemon import spawn_daemon
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest


class Slow(Policy):
    """Accepts every group after a while, the later the lower its address (answers out of read order)."""

    name = "slow"

    async def decide(self, group: FaultGroup) -> int:
        await asyncio.sleep(0.002 * (20 - group.addresses[-1] // 0x1000 % 20))
        return SUCCESS


@pytest.mark.asyncio
async def test_every_group_answered_is_recorded_once_with_its_address(monkeypatch):
    monkeypatch.setenv(TRACED_ENV, "fixed,slow")  # "untraced" keeps its counts and clocks, not its reads
    recorder = Recorder()
    with recorder.installed():
        engine = Engine()
        queues = {"fixed": EmulatedFaultQueue(), "slow": EmulatedFaultQueue(), "untraced": EmulatedFaultQueue()}
        engine.add(QueueResponder(queues["fixed"].open(), FixedPolicy("accept", SUCCESS), QueueConfig("fixed")))
        engine.add(QueueResponder(queues["untraced"].open(), FixedPolicy("accept", SUCCESS),
                                  QueueConfig("untraced")))
        engine.add(QueueResponder(queues["slow"].open(), Slow(), QueueConfig("slow", response_deadline=0.03)))
        engine.start()
        for round_ in range(3):  # the cookies of one round come back in the next
            for queue in queues.values():
                for i in range(20):
                    queue.report(PageRequest(dev_id=1, addr=0x1000 * (round_ * 20 + i + 1)))
            async with asyncio.timeout(5):
                while any(q.undelivered for q in queues.values()) or any(
                        q.pending for q in engine.queues.values()):
                    await asyncio.sleep(0.001)
        await engine.stop(0)
    assert Engine.add.__name__ == "add" and engine.queues["fixed"].observer is not None
    report = recorder.report()
    addresses = sorted(0x1000 * (i + 1) for i in range(60))
    for name in queues:
        figures = report["queues"][name]
        assert figures["outcomes"]["success"] + figures["outcomes"]["deadline"] == 60
        assert figures["latency"]["count"] == 60
        assert figures["first_read"] <= figures["last_write"]
        answered = figures["answered_at"]
        if name == "untraced":
            assert answered == []
            continue
        assert sorted(addr for addr, _ in answered) == addresses
        assert all(figures["first_read"] <= at <= figures["last_write"] for _, at in answered)
    assert report["queues"]["fixed"]["late"] == 0
    slow = report["queues"]["slow"]  # its slowest calls miss the 30 ms deadline: answered at it, not late
    assert slow["latency"]["p100"] <= 0.03 + LATE_SLACK and slow["late"] == 0
    assert report["overall"]["latency"]["count"] == 180 and report["cpu_seconds"] > 0 and report["maxrss_kb"] > 0


@pytest.mark.timeout(200)
def test_the_recorder_runs_iopfd_and_writes_the_report_and_profile_at_a_clean_exit(tmp_path):
    report, profile = tmp_path / "report.json", tmp_path / "iopfd.pstats"
    daemon = spawn_daemon(tmp_path, (), "--metrics-address", "127.0.0.1:0",
                          program=("-m", "iopfd_dev.bench.recorder", str(report), "run"),
                          env={"IOPFD_CONTROL__PATH": f"{tmp_path}/control.sock", "IOPFD_RUNTIME_DIR": str(tmp_path),
                               "IOPFD_WATCH_DEVICES": "false", PROFILE_ENV: str(profile)})
    try:
        assert daemon.terminate() == 0
    finally:
        daemon.close()
    figures = json.loads(report.read_text())
    assert figures["queues"] == {} and figures["overall"]["latency"]["count"] == 0 and figures["maxrss_kb"] > 0
    # profiled from READY=1 to the end of the stop: the engine's stop is in it, its start-up is not
    profiled = {function for _, _, function in pstats.Stats(str(profile)).stats}  # type: ignore[attr-defined]
    assert "stop" in profiled and "load_settings" not in profiled
