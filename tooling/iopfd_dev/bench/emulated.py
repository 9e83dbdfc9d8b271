"""The scenarios on the emulated fault queue, each in a process of its own (``python -m
iopfd_dev.bench.emulated``): the daemon's own ``Server`` (config, policies, metrics endpoint, deadlines)
serves ``EmulatedFaultQueue``s instead of kernel fds, so the figures need no lab and no kernel. The
figures are the bench's recorder's (``iopfd_dev.bench.recorder``), as for the daemon in the lab.

The emulation runs in the daemon's process, so its work (packing every record in Python) counts in
the CPU figures: they bound the engine from above. Bursts are queued before READY=1, the steady
stream is raised from the same event loop at the offered rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from iopfd.engine import Engine
from iopfd.iommufd import PERM_READ
from iopfd_dev.bench.recorder import Recorder
from iopfd_dev.bench.run import MULTI_QUEUES, POLICY_TABLES, STORM, Result, shares
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

STEADY_TICK = 0.001  # the steady stream is raised in slices of a millisecond's worth
STORM_CONFIG = (f'policy = "{STORM["policy"]}"\n[defaults]\n'
                + "".join(f"{key} = {value}\n" for key, value in STORM.items() if key != "policy") + POLICY_TABLES)


def _fault(i: int) -> PageRequest:
    return PageRequest(dev_id=1, addr=0x1000 * (i + 1), grpid=i % 512, perm=PERM_READ)


async def _serve(scenario: str, groups: int, rate: float) -> None:
    from iopfd.policies import Policies
    from iopfd.service.config import load_settings
    from iopfd.service.server import Server

    with tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp:
        config = Path(tmp) / "iopfd.toml"
        config.write_text(STORM_CONFIG if scenario == "storm" else "")  # else: accept
        settings = load_settings(config, metrics_address="127.0.0.1:0")
    server = Server(settings, Engine(), Policies.build_all(settings.policy_tables, settings.policy))
    counts = shares(groups, MULTI_QUEUES if scenario == "multi" else 1)
    emulated = [EmulatedFaultQueue() for _ in counts]
    for i, queue in enumerate(emulated):
        server.queues.add(f"bench-{i}", queue.open())
    if scenario != "steady":
        for queue, count in zip(emulated, counts):
            for i in range(count):
                queue.report(_fault(i))
    serving = asyncio.get_running_loop().create_task(server.serve())
    if scenario == "steady":
        await _offer(emulated[0], groups, rate)
    while any(len(queue.answers) < count for queue, count in zip(emulated, counts)):
        if serving.done():
            raise RuntimeError("the server stopped before answering every group")
        await asyncio.sleep(0.01)
    server.request_stop("benchmark done")
    await serving
    for queue in emulated:
        if queue.pending_cookies or queue.undelivered:
            raise RuntimeError("groups left open in the emulated queue")
        queue.close()


async def _offer(queue: EmulatedFaultQueue, groups: int, rate: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    raised = 0
    while raised < groups:
        due = min(groups, int((loop.time() - start) * rate) + 1)
        for i in range(raised, due):
            queue.report(_fault(i))
        raised = due
        await asyncio.sleep(STEADY_TICK)


def run_scenario(scenario: str, groups: int, *, rate: float = 0) -> Result:
    """Runs the scenario in a child process and returns its figures."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="iopfd-bench-") as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "iopfd_dev.bench.emulated", scenario, str(groups), repr(rate),
                        str(report)],
                       check=True, stdout=subprocess.DEVNULL, timeout=3600,
                       env={**os.environ, "IOPFD_CONTROL__PATH": "off", "IOPFD_WATCH_DEVICES": "false",
                            "IOPFD_LOG_LEVEL": "warning", "NOTIFY_SOCKET": ""})
        figures = json.loads(report.read_text())
    queues = figures["queues"].values()
    outcomes = {k: sum(q["outcomes"][k] for q in queues) for k in next(iter(queues))["outcomes"]}
    return Result(scenario, "iopfd", groups, sum(outcomes.values()),
                  max(q["last_write"] for q in queues) - min(q["first_read"] for q in queues),
                  figures["cpu_seconds"], figures["maxrss_kb"],
                  policy=STORM["policy"] if scenario == "storm" else "accept", source="emulated", kernel="emulated",
                  queues=len(queues), offered_rate=rate if scenario == "steady" else None,
                  latency=figures["overall"]["latency"], late=figures["overall"]["late"], shed=outcomes["shed"],
                  outcomes=outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m iopfd_dev.bench.emulated")
    parser.add_argument("scenario")
    parser.add_argument("groups", type=int)
    parser.add_argument("rate", type=float)
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    from iopfd.service.logging import configure_logging

    configure_logging("warning")
    recorder = Recorder()
    with recorder.installed():
        asyncio.run(_serve(args.scenario, args.groups, args.rate))
    args.report.write_text(json.dumps(recorder.report()))


if __name__ == "__main__":
    main()
