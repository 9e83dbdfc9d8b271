"""The fault-delivery engine: read groups, ask the policy, answer by the deadline, write back."""

from iopfd.engine.engine import Engine
from iopfd.engine.events import EventQueueServer, Vevent
from iopfd.engine.batch import Batch
from iopfd.engine.policy import CODES, BatchPolicy, FixedPolicy, Policy, RoutingPolicy
from iopfd.engine.queue import QueueConfig, QueueServer
from iopfd.engine.stats import OUTCOMES, EventStats, QueueStats

__all__ = ["CODES", "OUTCOMES", "Batch", "BatchPolicy", "Engine", "EventQueueServer", "EventStats", "FixedPolicy",
           "Policy", "QueueConfig", "QueueServer", "QueueStats", "RoutingPolicy", "Vevent"]
