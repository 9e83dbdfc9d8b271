"""Policies decide fault groups: built-ins (accept, reject, rules, forward, ioas-map) and plug-ins."""

from iopfd.engine.policy import BatchPolicy, FixedPolicy, Policy, RoutingPolicy
from iopfd.policies.forward import Channel, ForwardPolicy
from iopfd.policies.ioas_map import IoasMapPolicy
from iopfd.policies.registry import ENTRY_POINT_GROUP, Policies, PolicyError, policy_type
from iopfd.policies.rules import Rule, RulesPolicy

__all__ = ["ENTRY_POINT_GROUP", "BatchPolicy", "Channel", "FixedPolicy", "ForwardPolicy", "IoasMapPolicy", "Policies",
           "Policy", "PolicyError", "RoutingPolicy", "Rule", "RulesPolicy", "policy_type"]
