"""``rules``: the first rule that matches a group selects the policy that decides it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from iopfd.engine.policy import Policy
from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.fault import FaultGroup
from iopfd.iommufd.uapi import lib

PERMS = {"read": lib.IOMMU_PGFAULT_PERM_READ, "write": lib.IOMMU_PGFAULT_PERM_WRITE,
         "exec": lib.IOMMU_PGFAULT_PERM_EXEC, "priv": lib.IOMMU_PGFAULT_PERM_PRIV}
U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[int, Field(ge=0, le=1 << 64)]


class Rule(BaseModel):
    """Every condition given must hold; a rule with none matches everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dev_id: list[U32] | None = None
    pasid: list[U32 | Literal["none"]] | None = None  # "none": groups without a PASID
    address: tuple[U64, U64] | None = None  # [start, end): every faulting address of the group inside
    perm: list[Literal["read", "write", "exec", "priv"]] | None = None  # the group asks for nothing else
    queue: list[str] | None = None
    policy: str

    @model_validator(mode="after")
    def _range_not_empty(self) -> Rule:
        if self.address is not None and self.address[0] >= self.address[1]:
            raise ValueError(f"address range [{self.address[0]:#x}, {self.address[1]:#x}) is empty; "
                             "give [start, end) with start < end")
        return self

    def matches(self, group: FaultGroup) -> bool:
        if self.dev_id is not None and group.dev_id not in self.dev_id:
            return False
        if self.pasid is not None and (group.pasid if group.pasid_valid else "none") not in self.pasid:
            return False
        if self.queue is not None and group.queue not in self.queue:
            return False
        if self.perm is not None:
            allowed = 0
            for name in self.perm:
                allowed |= PERMS[name]
            if group.perm & ~allowed:
                return False
        if self.address is not None:
            start, end = self.address
            if not all(start <= addr < end for addr in group.addresses):
                return False
        return True


class RulesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = []
    default: str = "reject"  # the policy for groups no rule matches


class RulesPolicy(Policy):
    """Routes each group to a sub-policy; the engine calls ``select`` and then the sub-policy."""

    Options = RulesOptions

    def __init__(self, name: str, rules: list[tuple[Rule, Policy]], default: Policy) -> None:
        self.name = name
        self.rules = rules
        self.default = default

    @classmethod
    def from_config(cls, name: str, options: RulesOptions, lookup: Callable[[str, str], Policy]) -> RulesPolicy:
        rules = [(rule, lookup(rule.policy, f"rules.{index}.policy")) for index, rule in enumerate(options.rules)]
        return cls(name, rules, lookup(options.default, "default"))

    def bind(self, queue: str, iommufd: Iommufd | None) -> None:
        for policy in self._policies():
            policy.bind(queue, iommufd)

    def unbind(self, queue: str) -> None:
        for policy in self._policies():
            policy.unbind(queue)

    def _policies(self) -> list[Policy]:
        """Each sub-policy once, even when several rules select it."""
        return list({id(policy): policy for _, policy in [*self.rules, (None, self.default)]}.values())

    def select(self, group: FaultGroup) -> Policy:
        for rule, policy in self.rules:
            if rule.matches(group):
                return policy
        return self.default

    async def decide(self, group: FaultGroup) -> int:
        return await self.select(group).decide(group)
