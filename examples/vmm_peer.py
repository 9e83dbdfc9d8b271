"""What a VMM does with iopfd, in Python: hand over a fault queue (attach) or have iopfd open one
(broker), let a device fault, and read iopfd's status. The "device" is the kernel's mock IOMMU, so
this runs inside the kernel lab next to ``iopfd run``:

    uv run iopfd lab run -- sh -c 'iopfd run --metrics-address off & sleep 15; \
        python examples/vmm_peer.py --mode broker --faults 100'
"""

from __future__ import annotations

import argparse
import time

from iopfd.client import DEFAULT_PATH, Client
from iopfd.iommufd import FaultingMockSetup, FaultQueue, Iommufd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=DEFAULT_PATH, help="iopfd's control socket (default: %(default)s)")
    parser.add_argument("--mode", choices=["attach", "broker"], default="attach")
    parser.add_argument("--queue", default="example-vm")
    parser.add_argument("--faults", type=int, default=100)
    args = parser.parse_args()

    with Client(args.socket) as iopfd:
        if args.mode == "attach":
            # The VMM owns /dev/iommu and the fault queue; iopfd gets a duplicate of the fault fd.
            ctx = Iommufd.open()
            queue = FaultQueue.alloc(ctx)
            iopfd.attach(queue.fd, args.queue, labels={"vm": "example"})
            fault_id = queue.id
        else:
            # iopfd opens /dev/iommu and the fault queue; the VMM builds its HWPTs in that iommufd.
            fd, fault_id = iopfd.broker(args.queue, labels={"vm": "example"})
            ctx, queue = Iommufd(fd), None
        with FaultingMockSetup(ctx, fault_id) as rig:  # IOAS, mock device, nested HWPT with fault_id
            for i in range(args.faults):
                rig.device.trigger_iopf(addr=0x1000 * (i + 1), grpid=i % 512)
            while (answered := _answered(iopfd.status(), args.queue)) < args.faults:
                time.sleep(0.05)
            print(f"{args.mode}: {args.faults} faults, iopfd answered {answered}: "
                  f"{iopfd.status()['queues'][0]['outcomes']}")
            iopfd.detach(args.queue)
        if queue is not None:
            queue.close()
        ctx.close()
    return 0


def _answered(status: dict, name: str) -> int:
    return sum(sum(q["outcomes"].values()) for q in status["queues"] if q["name"] == name)


if __name__ == "__main__":
    raise SystemExit(main())
