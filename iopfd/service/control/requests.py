"""What a control request must look like (docs/protocol.md), checked before anything is opened.

Pure functions of the decoded message: each returns the checked fields or raises the ProtocolError
the peer gets. What depends on the daemon's state (a queue that exists, the queue limit, a policy
that exists) is the op handlers' to check (``ops``).
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from iopfd import protocol
from iopfd.iommufd.viommu import TYPES as VEVENTQ_TYPES
from iopfd.protocol import ProtocolError
from iopfd.service.config import NAME_RULE, Name

_names = TypeAdapter(Name)
DEV_ID = re.compile(r"[0-9]{1,10}")  # a dev_id (u32) in decimal


@dataclass(frozen=True)
class NewQueue:
    """An attach or broker request, checked."""

    name: str
    policy: str | None  # None: the config's default policy
    labels: dict[str, str]
    devices: dict[int, str]


@dataclass(frozen=True)
class Forward:
    """A forward request, checked."""

    policy: str
    read_records: int
    events: bool  # a second channel, for vEVENTs


def echoable(request_id: object) -> bool:
    """Whether every reply can echo this id: short, and nested so little that encoding it (a few calls
    deeper in the stack than it was decoded) cannot hit the recursion limit."""
    containers, depth = [request_id], 0
    while containers := [value for value in containers if isinstance(value, (dict, list))]:
        depth += 1
        if depth > protocol.MAX_ID_DEPTH:
            return False
        containers = [child for value in containers for child in (value.values() if isinstance(value, dict) else value)]
    return len(json.dumps(request_id)) <= protocol.MAX_ID


def id_refused() -> ProtocolError:
    return ProtocolError("bad-request", f"id: at most {protocol.MAX_ID} bytes of JSON, nested at most "
                                        f"{protocol.MAX_ID_DEPTH} deep (every reply echoes it)")


def queue_name(message: dict) -> str:
    try:
        return _names.validate_python(message.get("queue"))
    except ValidationError:
        raise ProtocolError("bad-request", f"queue: {NAME_RULE}, got {reprlib.repr(message.get('queue'))}") from None


def policy_name(value: object) -> str:
    """A policy's name as a request gives it; a string that no config could name a policy so is no
    such policy."""
    if not isinstance(value, str):
        raise ProtocolError("bad-request", f"policy: a policy name, got {reprlib.repr(value)}")
    try:
        return _names.validate_python(value)
    except ValidationError:
        raise ProtocolError("no-such-policy", f"no policy is named {reprlib.repr(value)}: names are "
                                              f"{NAME_RULE}") from None


def new_queue(message: dict) -> NewQueue:
    """Every field of an attach or broker request."""
    name = queue_name(message)
    policy = message.get("policy")
    labels = _object_of_strings(message, "labels", '{"vm": "guest1"}')
    if "queue" in labels:  # log lines name the queue under that key
        raise ProtocolError("bad-request", 'labels: "queue" is the queue\'s name in log lines; use another key')
    devices = _object_of_strings(message, "devices", '{"4": "0000:00:04.0"}')
    bad = next((key for key in devices if not DEV_ID.fullmatch(key)), None)
    if bad is not None:
        raise ProtocolError("bad-request", f"devices: keys are dev_ids in decimal, got {reprlib.repr(bad)}")
    return NewQueue(name, None if policy is None else policy_name(policy), labels,
                    {int(key): value for key, value in devices.items()})


def attach_fds(fds: list[int]) -> None:
    if len(fds) not in (1, 2):
        raise ProtocolError("missing-fd", f"attach carries the fault fd and optionally a vEVENTQ fd, got "
                                          f"{len(fds)} fds")


def veventq_type(message: dict, has_fd: bool) -> int | None:
    """The type of the vEVENTQ fd an attach carries second: the fd alone does not say it."""
    name = message.get("veventq_type")
    if not has_fd:
        if name is not None:
            raise ProtocolError("missing-fd", "veventq_type names the type of the vEVENTQ fd sent second, after "
                                              "the fault fd; only one fd came")
        return None
    if not isinstance(name, str) or name not in VEVENTQ_TYPES:
        raise ProtocolError("bad-request", f"veventq_type: the type of the vEVENTQ fd, one of "
                                           f"{', '.join(sorted(VEVENTQ_TYPES))}; got {reprlib.repr(name)}")
    return VEVENTQ_TYPES[name]


def forward(message: dict) -> Forward:
    name = message.get("policy")
    if not isinstance(name, str):
        raise ProtocolError("bad-request", f"policy: the name of a policy of type forward, got "
                                           f"{reprlib.repr(name)}")
    policy = policy_name(name)
    read_records = message.get("read_records", protocol.DEFAULT_READ_RECORDS)
    if type(read_records) is not int or not 1 <= read_records <= protocol.MAX_READ_RECORDS:
        raise ProtocolError("bad-request", f"read_records: how many fault records the peer reads at once, 1 to "
                                           f"{protocol.MAX_READ_RECORDS}; got {reprlib.repr(read_records)}")
    events = message.get("events", False)
    if type(events) is not bool:
        raise ProtocolError("bad-request", f"events: true or false, got {reprlib.repr(events)}")
    return Forward(policy, read_records, events)


def _object_of_strings(message: dict, key: str, example: str) -> dict[str, str]:
    value = message.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise ProtocolError("bad-request", f"{key}: an object of strings, e.g. {example}, got {reprlib.repr(value)}")
    return value
