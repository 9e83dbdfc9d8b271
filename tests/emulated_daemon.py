"""``iopfd run`` over emulated fault queues under load, as a process of its own (host tests that need a
whole daemon without a kernel, e.g. a real Prometheus scraping it).

    python tests/emulated_daemon.py CONFIG

The daemon is built as ``iopfd run --config CONFIG`` builds it (``prepare``: policies, control socket,
systemd notification) and serves two EmulatedFaultQueues until SIGTERM, while this process raises
faults on them: every outcome, and refused responses.
- ``vm1`` (policy ``mixed``): dev_id 1 accepted, dev_id 2 rejected (100 groups/s each), dev_id 3 slow
  (10 groups/s) so it misses response_deadline; dev_id 3 is detached every second with a group
  pending, which the "kernel" answers and whose cookie it reuses at once: the daemon counts it as
  an error and a refused response.
- ``vm2`` (policy ``slow``): bursts of BURST groups a second, more than max_pending: the rest is shed.
Exits with the daemon's status, 1 if any group it read is left unanswered.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from iopfd.iommufd import PERM_READ
from iopfd.service.config import load_settings
from iopfd.service.logging import configure_logging
from iopfd.service.prepare import prepare
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest

CONFIG = """\
log_format = "json"
metrics_address = "127.0.0.1:0"
shutdown_grace = 0.1
policy = "mixed"
watch_devices = false
runtime_dir = "{tmp}"

[control]
path = "{tmp}/control.sock"

[defaults]
response_deadline = 0.2
max_pending = 64

[policies.slow]
type = "iopfd_dev.policies:DelayPolicy"
seconds = 1.0

[policies.mixed]
type = "rules"
default = "slow"

[[policies.mixed.rules]]
dev_id = [1]
policy = "accept"

[[policies.mixed.rules]]
dev_id = [2]
policy = "reject"
"""
TICK = 0.01  # seconds between load slices
BURST = 100  # vm2's groups per second, in one burst
REUSE = 8  # groups raised right after a detach: more than the cookies in use, so freed ones are reused


def write_config(tmp: Path) -> Path:
    path = tmp / "iopfd.toml"
    path.write_text(CONFIG.format(tmp=tmp))
    return path


async def load(vm1: EmulatedFaultQueue, vm2: EmulatedFaultQueue) -> None:
    tick = 0
    while True:
        for dev_id in (1, 2):
            vm1.report(PageRequest(dev_id=dev_id, addr=0x1000 * (tick % 4096 + 1), perm=PERM_READ))
        if tick % 10 == 0:
            vm1.report(PageRequest(dev_id=3, addr=0x1000, perm=PERM_READ))
        if tick % 100 == 45:
            vm1.detach(3)  # its groups read in the last response_deadline are pending: the kernel answers them
            for i in range(REUSE):  # and hands their cookies to new groups: the daemon counts an error
                vm1.report(PageRequest(dev_id=1, addr=0x1000 * (i + 1), grpid=i, perm=PERM_READ))
        if tick % 100 == 0:
            for i in range(BURST):
                vm2.report(PageRequest(dev_id=1, addr=0x1000 * (i + 1), grpid=i, perm=PERM_READ))
        tick += 1
        await asyncio.sleep(TICK)


async def main(config: Path) -> int:
    settings = load_settings(config)
    configure_logging(settings.log_level, settings.log_format)
    server = prepare(settings, [])
    vm1, vm2 = EmulatedFaultQueue(), EmulatedFaultQueue()
    server.queues.add("vm1", vm1.open())
    server.queues.add("vm2", vm2.open(), policy="slow")
    loading = asyncio.get_running_loop().create_task(load(vm1, vm2))
    try:
        status = await server.serve()
    finally:
        loading.cancel()
    # Raised and never read is the kernel's to keep; read and not answered is a bug.
    left = {name: queue.pending_cookies for name, queue in (("vm1", vm1), ("vm2", vm2)) if queue.pending_cookies}
    if left:
        print(f"groups read and left unanswered, cookies by queue: {left}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]))))
