"""What a VMM does with iopfd, in Python: hand over a fault queue (attach) or have iopfd open one
(broker), let a device fault, and read iopfd's status; with ``--forward POLICY`` (a ``forward``
policy of the daemon's config), decide the faults itself over the peer channel, a packet of records
at a time. The "device" is the kernel's mock IOMMU, so this runs inside the kernel lab next to
``iopfd run``:

    uv run iopfd-dev lab run -- sh -c 'iopfd run --metrics-address off & sleep 15; \
        python examples/vmm_peer.py --mode broker --faults 100'

    printf '[policies.vmm]\ntype = "forward"\n' > /tmp/fwd.toml
    uv run iopfd-dev lab run -- sh -c 'iopfd run --config /tmp/fwd.toml --metrics-address off & sleep 15; \
        python examples/vmm_peer.py --forward vmm --faults 1000'
"""

from __future__ import annotations

import argparse
import time

import numpy

from iopfd.client import DEFAULT_PATH, INVALID, LAST_PAGE, SUCCESS, Client, ForwardChannel
from iopfd.iommufd import FaultQueue, Iommufd
from iopfd.iommufd.selftest import FaultingMockSetup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=DEFAULT_PATH, help="iopfd's control socket (default: %(default)s)")
    parser.add_argument("--mode", choices=["attach", "broker"], default="attach")
    parser.add_argument("--queue", default="example-vm")
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--forward", metavar="POLICY", help="decide the faults here, as the peer of this forward "
                        "policy (the queue is served with it)")
    args = parser.parse_args()

    with Client(args.socket) as iopfd:
        channel = iopfd.forward(args.forward, read_records=256) if args.forward else None
        if args.mode == "attach":
            # The VMM owns /dev/iommu and the fault queue; iopfd gets a duplicate of the fault fd.
            ctx = Iommufd.open()
            queue = FaultQueue.alloc(ctx)
            iopfd.attach(queue.fd, args.queue, policy=args.forward, labels={"vm": "example"})
            fault_id = queue.id
        else:
            # iopfd opens /dev/iommu and the fault queue; the VMM builds its HWPTs in that iommufd.
            fd, fault_id = iopfd.broker(args.queue, policy=args.forward, labels={"vm": "example"})
            ctx, queue = Iommufd(fd), None
        with FaultingMockSetup(ctx, fault_id) as rig:  # IOAS, mock device, nested HWPT with fault_id
            for i in range(args.faults):
                rig.device.trigger_iopf(addr=0x1000 * (i + 1), grpid=i % 512)
            if channel is not None:
                print(f"forward: the peer answered {decide(channel, args.faults)} groups")
            while (answered := _answered(iopfd.status(), args.queue)) < args.faults:
                time.sleep(0.05)
            print(f"{args.mode}: {args.faults} faults, iopfd answered {answered}: "
                  f"{iopfd.status()['queues'][0]['outcomes']}")
            iopfd.detach(args.queue)
        if queue is not None:
            queue.close()
        ctx.close()
    if channel is not None:
        channel.close()
    return 0


def decide(channel: ForwardChannel, faults: int) -> int:
    """Answer packets of groups until ``faults`` groups are answered: SUCCESS below 64 KiB, else
    INVALID (the guest's own decision, in a real VMM), one array and one send per packet."""
    def codes(records: numpy.ndarray) -> numpy.ndarray:
        last = records[(records["flags"] & LAST_PAGE) != 0]  # each group's last record
        return numpy.where(last["addr"] < 0x10000, SUCCESS, INVALID)

    return channel.serve(codes, count=faults)


def _answered(status: dict, name: str) -> int:
    return sum(sum(q["outcomes"].values()) for q in status["queues"] if q["name"] == name)


if __name__ == "__main__":
    raise SystemExit(main())
