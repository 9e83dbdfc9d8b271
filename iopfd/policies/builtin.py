"""The two fixed answers: accept (SUCCESS) and reject (INVALID)."""

from __future__ import annotations

from collections.abc import Sequence

from iopfd.engine.policy import BatchPolicy
from iopfd.iommufd.fault import INVALID, SUCCESS, FaultGroup


class AcceptPolicy(BatchPolicy):
    """Answer SUCCESS: the page is (or will be) mapped, the device retries the access."""

    fixed_code = SUCCESS

    def __init__(self, name: str = "accept") -> None:
        self.name = name

    async def decide_batch(self, groups: Sequence[FaultGroup]) -> list[int]:
        return [SUCCESS] * len(groups)


class RejectPolicy(BatchPolicy):
    """Answer INVALID: the device gets a response failure for the access."""

    fixed_code = INVALID

    def __init__(self, name: str = "reject") -> None:
        self.name = name

    async def decide_batch(self, groups: Sequence[FaultGroup]) -> list[int]:
        return [INVALID] * len(groups)
