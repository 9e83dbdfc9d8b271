"""The fault-delivery engine: read groups, ask the policy, answer by the deadline, write back."""

from iopfd.engine.batch import Batch
from iopfd.engine.engine import Engine
from iopfd.engine.events import EventQueueReader, Vevent
from iopfd.engine.policy import BatchPolicy, FixedPolicy, Policy, RoutingPolicy
from iopfd.engine.queue import QueueConfig, QueueResponder
from iopfd.engine.stats import OUTCOMES, EventStats, QueueStats

__all__ = ["OUTCOMES", "Batch", "BatchPolicy", "Engine", "EventQueueReader", "EventStats", "FixedPolicy",
           "Policy", "QueueConfig", "QueueResponder", "QueueStats", "RoutingPolicy", "Vevent"]
