"""The inherited fds ``iopfd run`` is given on its command line: ``--fault-fd``, ``--forward-fd`` and
``--forward-events-fd``. Each value is checked as argparse parses it, so argparse names the flag."""

from __future__ import annotations

from dataclasses import dataclass

from iopfd import protocol
from iopfd.service.config import NAME_RULE, is_name

MAX_FD = 2**31 - 1  # an int in the kernel


class UsageError(Exception):
    """Bad command-line input (exit 2), e.g. an fd that is not a fault fd."""


@dataclass(frozen=True)
class FaultFdArg:
    """``--fault-fd N[:NAME]``."""

    fd: int
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> FaultFdArg:
        number, _, name = text.partition(":")
        if not number.isdigit() or int(number) > MAX_FD:
            raise ValueError(f"{text!r}: expected N or N:NAME, N an inherited file descriptor number")
        if name and not is_name(name):
            raise ValueError(f"{text!r}: the queue name must be {NAME_RULE}")
        return cls(int(number), name or None)


@dataclass(frozen=True)
class ForwardFdArg:
    """``--forward-fd N:POLICY[:RECORDS]``: the inherited socket N is the peer channel of the forward
    policy POLICY; the peer reads RECORDS fault records at once (default 256)."""

    fd: int
    policy: str
    read_records: int = protocol.DEFAULT_READ_RECORDS

    @classmethod
    def parse(cls, text: str) -> ForwardFdArg:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1]:
            raise ValueError(f"{text!r}: expected N:POLICY or N:POLICY:RECORDS, N an inherited socket's fd number")
        if len(parts) == 3 and not (parts[2].isdigit() and 1 <= int(parts[2]) <= protocol.MAX_READ_RECORDS):
            raise ValueError(f"{text!r}: RECORDS is how many fault records the peer reads at once, 1 to "
                             f"{protocol.MAX_READ_RECORDS}")
        if len(parts) == 2:
            return cls(int(parts[0]), parts[1])
        return cls(int(parts[0]), parts[1], int(parts[2]))


@dataclass(frozen=True)
class ForwardEventsFdArg:
    """``--forward-events-fd M:POLICY``: the inherited socket M carries POLICY's vEVENTs to its peer."""

    fd: int
    policy: str

    @classmethod
    def parse(cls, text: str) -> ForwardEventsFdArg:
        number, _, policy = text.partition(":")
        if not number.isdigit() or not policy:
            raise ValueError(f"{text!r}: expected M:POLICY, M an inherited socket's fd number")
        return cls(int(number), policy)
