"""The forward peer as a Python VMM would write it, with the client's batch API
(``ForwardChannel.serve``): every group of a packet answered SUCCESS in one call.

    python -m iopfd_dev.bench.peer FD RECORDS

serves the inherited channel end FD (reading RECORDS records at once) until iopfd closes it, then
prints the groups it answered as one JSON line, as c/peer.c does.
"""

from __future__ import annotations

import json
import sys

from iopfd.client import ForwardChannel
from iopfd.iommufd.fault import SUCCESS


def main() -> None:
    fd, records = int(sys.argv[1]), int(sys.argv[2])
    with ForwardChannel.from_fds(fd, read_records=records) as channel:
        answered = channel.serve(lambda records: SUCCESS)
    print(json.dumps({"groups": answered}))


if __name__ == "__main__":
    main()
