"""Policies the benchmarks and tests need, loaded by import path (`type = "iopfd_dev.policies:DelayPolicy"`)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from iopfd.engine.policy import Policy
from iopfd.iommufd.fault import SUCCESS, FaultGroup


class DelayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(0.005, ge=0, le=60)  # how long each decision takes


class DelayPolicy(Policy):
    """SUCCESS after ``seconds`` per group, each group on its own: a slow policy for storm tests."""

    Options = DelayOptions

    def __init__(self, name: str, options: DelayOptions) -> None:
        self.name = name
        self.seconds = options.seconds

    async def decide(self, group: FaultGroup) -> int:
        await asyncio.sleep(self.seconds)
        return SUCCESS


class ImmediatePolicy(Policy):
    """SUCCESS at once, per group: what the engine's per-group path costs a plug-in that decides at once."""

    async def decide(self, group: FaultGroup) -> int:
        return SUCCESS


def import_path(policy: type[Policy]) -> str:
    """The config's ``type`` for a policy class: ``package.module:Class``."""
    return f"{policy.__module__}:{policy.__qualname__}"
