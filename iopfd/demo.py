"""``iopfd demo``: faults from the kernel's mock IOMMU, read and answered through iopfd's typed layer.

Until the daemon (``iopfd run``) exists, the demo drives the fault queue directly: it shows what
the kernel offers (``iopfd probe``), then triggers mock page faults on a nested HWPT with a fault
queue, reads every group and answers it, and checks the kernel took every answer.
"""

from __future__ import annotations

import os
import select
import sys
import time

from iopfd.lab.guest import GUEST_ENV


def main(*, here: bool, kernel: str, faults: int) -> int:
    if not here and not os.environ.get(GUEST_ENV):
        from iopfd.lab import vm
        from iopfd.lab.errors import LabError

        try:
            return vm.run([sys.executable, "-m", "iopfd", "demo", "--here", "--faults", str(faults)], kernel=kernel)
        except LabError as exc:
            print(f"iopfd demo: {exc}", file=sys.stderr)
            return 1
    return run_here(faults)


def run_here(faults: int) -> int:
    from iopfd.cli import main as cli_main
    from iopfd.iommufd import Iommufd, FaultQueue, FaultingMockSetup, IommufdError, SUCCESS, PERM_READ, PERM_WRITE

    print(f"kernel {os.uname().release}\n")
    cli_main(["probe"])
    print()
    try:
        with Iommufd.open() as ctx, FaultQueue.alloc(ctx) as queue, FaultingMockSetup(ctx, queue.id) as rig:
            print(f"mock device dev_id={rig.device.dev_id} on nested HWPT {rig.nested.id} "
                  f"(parent {rig.parent.id}), fault queue {queue.id} (fd {queue.fd})")
            answered = 0
            first = None
            started = time.perf_counter()
            for i in range(faults):
                rig.device.trigger_iopf(addr=0x1000 * (i + 1), grpid=i % 512, perm=PERM_READ | PERM_WRITE)
                if (i + 1) % 64 == 0 or i + 1 == faults:
                    groups = queue.read()
                    first = first or groups[0]
                    answered += queue.respond([(g.cookie, SUCCESS) for g in groups])
            elapsed = time.perf_counter() - started
            still_pending = bool(select.select([queue.fd], [], [], 0)[0])
    except IommufdError as exc:
        print(f"iopfd demo: {exc}", file=sys.stderr)
        return 1
    print(f"first group: cookie={first.cookie} {first.faults[0]}")
    print(f"triggered {faults} faults; read and answered {answered} groups in {elapsed:.3f} s; "
          f"queue {'still has' if still_pending else 'has no'} undelivered groups")
    return 0 if answered == faults and not still_pending else 1
