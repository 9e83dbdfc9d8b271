"""``rules``: the first rule that matches a group selects the policy that decides it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from iopfd.engine.batch import Batch, every, np
from iopfd.engine.policy import Policy, RoutingPolicy
from iopfd.iommufd.context import Iommufd
from iopfd.iommufd.fault import FaultGroup
from iopfd.iommufd.ioctl import lib

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


class RulesPolicy(RoutingPolicy):
    """Routes each group to a sub-policy. The rules are compiled once into numpy tests over a batch's
    columns; ``route`` answers a whole batch with one pass per rule."""

    Options = RulesOptions

    def __init__(self, name: str, rules: list[tuple[Rule, Policy]], default: Policy) -> None:
        self.name = name
        self.rules = rules
        self.default = default
        # One target per distinct policy, the default last among them; rule i routes to _rule_target[i].
        targets: dict[int, Policy] = {}
        for _, policy in [*rules, (None, default)]:
            targets.setdefault(id(policy), policy)
        self.targets = list(targets.values())
        position = {id(policy): index for index, policy in enumerate(self.targets)}
        self._rule_target = [position[id(policy)] for _, policy in rules]
        self._default_target = position[id(default)]
        self._compiled: list[Callable[[Batch], Any]] | None = None  # built on first use: it needs numpy

    @classmethod
    def from_config(cls, name: str, options: RulesOptions, lookup: Callable[[str, str], Policy]) -> RulesPolicy:
        rules = [(rule, lookup(rule.policy, f"rules.{index}.policy")) for index, rule in enumerate(options.rules)]
        return cls(name, rules, lookup(options.default, "default"))

    def bind(self, queue: str, iommufd: Iommufd | None) -> None:
        for policy in self.targets:
            policy.bind(queue, iommufd)

    def unbind(self, queue: str) -> None:
        for policy in self.targets:
            policy.unbind(queue)

    def route(self, batch: Batch) -> Any:
        n = np()
        if self._compiled is None:
            self._compiled = [_compile(rule) for rule, _ in self.rules]
        if self._compiled:
            hit = self._compiled[0](batch)
            if every(hit):  # the first rule takes the whole batch (a burst of one kind)
                return self._rule_target[0]
        route = n.full(len(batch), self._default_target, n.intp)
        unmatched = n.ones(len(batch), bool)
        for matches, target in zip(self._compiled, self._rule_target):
            hit = matches(batch) & unmatched
            route[hit] = target
            unmatched &= ~hit
            if not n.count_nonzero(unmatched):
                break
        return route

    def select(self, group: FaultGroup) -> Policy:
        """The policy for one group (the rules' reference semantics; the engine uses ``route``)."""
        for rule, policy in self.rules:
            if rule.matches(group):
                return policy
        return self.default

    async def decide(self, group: FaultGroup) -> int:
        return await self.select(group).decide(group)


def _compile(rule: Rule) -> Callable[[Batch], Any]:
    """The rule as a test of a whole batch: one boolean per group, as ``Rule.matches`` would say."""
    n = np()
    tests: list[Callable[[Batch], Any]] = []
    if rule.dev_id is not None:
        dev_ids = n.array(sorted(set(rule.dev_id)), n.uint32)
        tests.append(lambda batch: n.isin(batch.dev_id, dev_ids))
    if rule.pasid is not None:
        pasids = n.array(sorted({p for p in rule.pasid if p != "none"}), n.uint32)
        without = "none" in rule.pasid
        tests.append(lambda batch: n.where(batch.pasid_valid, n.isin(batch.pasid, pasids), without))
    if rule.queue is not None:
        queues = frozenset(rule.queue)
        tests.append(lambda batch: n.full(len(batch), batch.queue in queues))
    if rule.perm is not None:
        allowed = 0
        for name in rule.perm:
            allowed |= PERMS[name]
        refused = n.uint32(~allowed & 0xFFFFFFFF)
        tests.append(lambda batch: (batch.perm & refused) == 0)
    if rule.address is not None:
        start, end = rule.address
        # Each bound only if it excludes an address: a test is a pass over the batch.
        if start and end > 0xFFFFFFFFFFFFFFFF:  # [start, 2^64): no address is at or past the end
            tests.append(lambda batch: batch.addr_min >= n.uint64(start))
        elif start:
            tests.append(lambda batch: (batch.addr_min >= n.uint64(start)) & (batch.addr_max < n.uint64(end)))
        elif end <= 0xFFFFFFFFFFFFFFFF:
            tests.append(lambda batch: batch.addr_max < n.uint64(end))
    if not tests:
        return lambda batch: n.ones(len(batch), bool)
    if len(tests) == 1:
        return tests[0]

    def every(batch: Batch) -> Any:
        result = tests[0](batch)
        for test in tests[1:]:
            result = result & test(batch)
        return result
    return every
