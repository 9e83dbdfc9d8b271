"""``iopfd-dev demo``: the daemon answering a stream of mock page faults, with live figures.

Boots the kernel lab (unless this kernel has the selftest mock IOMMU, or ``--here``), creates a mock
device on a nested HWPT with a fault queue, starts ``iopfd run`` on that fault fd the way a VMM would
(the fd inherited, READY=1 awaited on a notify socket the demo owns), triggers faults as fast as it
can and prints groups/s, latency and outcomes each second from the daemon's metrics. At the end it
stops the daemon with SIGTERM and asks the kernel whether any group is left unanswered.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from iopfd_dev.lab.guest import GUEST_ENV

# Addresses below 0x8000_0000 are "guest memory" (accept); one fault in eight lands above (reject).
DEMO_CONFIG = """\
policy = "demo"
[policies.demo]
type = "rules"
default = "reject"
[[policies.demo.rules]]
address = [0x0, 0x8000_0000]
policy = "accept"
"""


def main(*, here: bool, kernel: str, duration: float) -> int:
    if not here and not os.environ.get(GUEST_ENV) and not _has_mock_iommu():
        from iopfd_dev.lab import vm
        from iopfd_dev.lab.errors import LabError

        try:
            return vm.run([sys.executable, "-m", "iopfd_dev", "demo", "--here", "--duration", str(duration)],
                          kernel=kernel)
        except LabError as exc:
            print(f"iopfd-dev demo: {exc}", file=sys.stderr)
            return 1
    return run_here(duration)


def _has_mock_iommu() -> bool:
    from iopfd.iommufd.probe import MOCK_IOMMU, YES, probe

    return os.path.exists("/dev/iommu") and any(f.name == MOCK_IOMMU and f.status == YES
                                                for f in probe())


def run_here(duration: float) -> int:
    from iopfd.iommufd import FaultQueue, Iommufd, IommufdError
    from iopfd.iommufd.selftest import FaultingMockSetup

    print(f"kernel {os.uname().release}")
    try:
        with Iommufd.open() as ctx, FaultQueue.alloc(ctx) as queue, FaultingMockSetup(ctx, queue.id) as rig, \
                tempfile.TemporaryDirectory(prefix="iopfd-demo-") as tmp:
            print(f"mock device dev_id={rig.device.dev_id} on nested HWPT {rig.nested.id}, "
                  f"fault queue {queue.id} (fd {queue.fd})")
            return _demo(queue, rig, Path(tmp), duration)
    except IommufdError as exc:
        print(f"iopfd-dev demo: {exc}", file=sys.stderr)
        return 1


def _demo(queue, rig, tmp: Path, duration: float) -> int:
    from iopfd.engine.stats import OUTCOMES
    from iopfd.iommufd import PERM_READ
    from iopfd_dev.daemon import DaemonError, open_cookies, spawn_daemon

    (tmp / "iopfd.toml").write_text(DEMO_CONFIG)
    port = _free_port()
    print(f"starting: iopfd run --fault-fd {queue.fd}:demo (policy: addresses below 0x80000000 accept, "
          "others reject)")
    try:
        daemon = spawn_daemon(tmp, (queue.fd,), "--config", str(tmp / "iopfd.toml"), "--fault-fd", f"{queue.fd}:demo",
                              "--metrics-address", f"127.0.0.1:{port}")
    except DaemonError as exc:
        print(f"iopfd-dev demo: the daemon did not become ready: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"daemon ready (pid {daemon.proc.pid}); metrics on http://127.0.0.1:{port}/metrics\n")
        triggered = _stream(rig, port, duration, PERM_READ)
        _wait_caught_up(port, triggered)
        status = daemon.terminate()
        totals = daemon.totals()
    finally:
        daemon.close()
    undelivered = bool(select.select([queue.fd], [], [], 0)[0])
    pending = open_cookies(queue, triggered)
    answered = sum(totals.get(k, 0) for k in OUTCOMES)
    print(f"\ndaemon exited with {status}; triggered {triggered} faults, the daemon answered {answered} groups: "
          + ", ".join(f"{totals.get(k, 0)} {k}" for k in OUTCOMES))
    print("kernel: " + ("nothing undelivered, no group left pending" if not undelivered and not pending
                        else f"undelivered={undelivered}, pending cookies {pending[:10]}"))
    return 0 if status == 0 and answered == triggered and not undelivered and not pending else 1


def _free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def _stream(rig, port: int, duration: float, perm: int) -> int:
    """Trigger faults until ``duration`` or Ctrl-C, printing a line of figures each second."""
    print(f"{'time':>5} {'triggered':>10} {'answered':>9} {'groups/s':>9} {'p50':>9} {'p99':>9} "
          f"{'success':>8} {'invalid':>8} {'deadline':>8} {'shed':>5} {'error':>5} {'pending':>7}")
    started = last_report = time.monotonic()
    last_answered = triggered = 0
    try:
        while (now := time.monotonic()) - started < duration:
            for _ in range(64):
                address = 0x1000 * (triggered + 1) + (0x8000_0000 if triggered % 8 == 7 else 0)
                rig.device.trigger_iopf(addr=address, grpid=triggered % 512, perm=perm)
                triggered += 1
            if now - last_report >= 1:
                figures = _scrape(port)
                answered = sum(figures["outcomes"].values())
                rate = (answered - last_answered) / (now - last_report)
                last_answered, last_report = answered, now
                o = figures["outcomes"]
                print(f"{now - started:>4.0f}s {triggered:>10} {answered:>9} {rate:>9.0f} "
                      f"{figures['p50']:>9} {figures['p99']:>9} {o['success']:>8} {o['invalid']:>8} "
                      f"{o['deadline']:>8} {o['shed']:>5} {o['error']:>5} {figures['pending']:>7}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted")
    return triggered


def _wait_caught_up(port: int, triggered: int, timeout: float = 120) -> None:
    """SIGTERM stops reading, so let the daemon read what is still queued first."""
    deadline = time.monotonic() + timeout
    while (answered := sum(_scrape(port)["outcomes"].values())) < triggered and time.monotonic() < deadline:
        print(f"waiting for the daemon to catch up: {answered} of {triggered} answered", flush=True)
        time.sleep(1)


def _scrape(port: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    figures: dict[str, Any] = {"outcomes": {}, "pending": 0, "buckets": []}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "iopfd_fault_groups_total":
                figures["outcomes"][sample.labels["outcome"]] = int(sample.value)
            elif sample.name == "iopfd_pending_groups":
                figures["pending"] += int(sample.value)
            elif sample.name == "iopfd_response_latency_seconds_bucket":
                figures["buckets"].append((float(sample.labels["le"]), sample.value))
    for quantile in ("p50", "p99"):
        figures[quantile] = _quantile_bound(figures["buckets"], int(quantile[1:]) / 100)
    return figures


def _quantile_bound(buckets: list[tuple[float, float]], quantile: float) -> str:
    """The histogram bucket the quantile falls in, as "<= bound"."""
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= quantile * total:
            return f"<={bound * 1e3:g}ms" if bound != float("inf") else ">5s"
    return "-"
