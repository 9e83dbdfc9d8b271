"""The two fixed answers: accept (SUCCESS) and reject (INVALID)."""

from __future__ import annotations

from iopfd.engine.policy import FixedPolicy
from iopfd.iommufd.fault import INVALID, SUCCESS


class AcceptPolicy(FixedPolicy):
    """Answer SUCCESS: the page is (or will be) mapped, the device retries the access."""

    def __init__(self, name: str = "accept") -> None:
        super().__init__(name, SUCCESS)


class RejectPolicy(FixedPolicy):
    """Answer INVALID: the device gets a response failure for the access."""

    def __init__(self, name: str = "reject") -> None:
        super().__init__(name, INVALID)
