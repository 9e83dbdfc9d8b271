"""Everything ``iopfd run`` checks and builds before it serves, so that bad input fails first: the
policies (a configuration error exits 78), the queues of the config and of ``--fault-fd`` (an fd
that is not a fault fd exits 2), the peer channels of ``--forward-fd``, the queues a previous life
left in systemd's fd store, and the control socket."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from iopfd.engine import Engine
from iopfd.iommufd import FaultQueue, IommufdError
from iopfd.policies import ForwardPolicy, Policies, PolicyError
from iopfd.service.arguments import FaultFdArg, ForwardEventsFdArg, ForwardFdArg, UsageError
from iopfd.service.config import ConfigError, QueueSettings, ResolvedQueue, Settings
from iopfd.service.control.transport import open_control_socket
from iopfd.service.peer_channel import EventChannel, FaultChannel, check_channel_socket
from iopfd.service.server import Server
from iopfd.service.systemd import listen_fds


def prepare(settings: Settings, fault_fds: Sequence[FaultFdArg],
            reload_settings: Callable[[], Settings] | None = None, *,
            forward_fds: Sequence[ForwardFdArg] = (), forward_events_fds: Sequence[ForwardEventsFdArg] = ()) -> Server:
    """Check and build everything; raises ConfigError, PolicyError or UsageError before serving.
    ``reload_settings`` loads the config again, for SIGHUP."""
    policies = Policies.build_all(settings.policy_tables, settings.policy)
    channels = forward_channels(policies, forward_fds, forward_events_fds, taken={arg.fd for arg in fault_fds})
    server = Server(settings, Engine(), policies, reload_settings=reload_settings, channels=channels)
    passed = listen_fds()  # what systemd passed: the control socket and the fd store's fault fds
    taken_back = server.queues.take_back(passed)
    queues = [queue for queue in resolve_queues(settings, fault_fds, allow_none=bool(taken_back))
              if queue.name not in taken_back]
    for queue in queues:
        policies.get(queue.policy, f"queue {queue.name!r} policy")
    for queue in queues:
        assert queue.fd is not None  # resolve_queues refuses a queue without one
        try:
            source = FaultQueue.adopt(queue.fd)
        except IommufdError as exc:
            raise UsageError(f"queue {queue.name!r}: {exc}") from None
        server.queues.add(queue.name, source, policy=queue.policy)
    if settings.control.enabled:
        server.control = open_control_socket(settings.control, passed.get("control"), server.control_state())
    return server


def resolve_queues(settings: Settings, fault_fds: Sequence[FaultFdArg], *,
                   allow_none: bool = False) -> list[ResolvedQueue]:
    """The config's queues with fds from ``--fault-fd`` applied (by name), plus one queue per
    unnamed or unknown ``--fault-fd``. Every queue needs an fd."""
    queues = list(settings.queues)
    index = {queue.name: i for i, queue in enumerate(queues)}
    for arg in fault_fds:
        name = arg.name or f"fd{arg.fd}"
        if name in index:
            queues[index[name]] = queues[index[name]].model_copy(update={"fd": arg.fd})
        else:
            index[name] = len(queues)
            queues.append(QueueSettings(name=name, fd=arg.fd))
    if not queues and not settings.control.enabled and not allow_none:
        raise UsageError("no fault queue to serve: pass --fault-fd N[:NAME] (an fd inherited from the VMM) "
                         "or list [[queues]] with an fd in the config, or enable the [control] socket")
    missing = [(f"queues.{i}.fd", f"queue {q.name!r} has no fault fd; set fd or pass --fault-fd N:{q.name}")
               for i, q in enumerate(queues) if q.fd is None]
    if missing:
        raise ConfigError(missing)
    fds = [q.fd for q in queues if q.fd is not None]
    duplicated = sorted({fd for fd in fds if fds.count(fd) > 1})
    if duplicated:
        raise UsageError(f"fd {duplicated[0]} is given to more than one queue; one fault fd is one queue")
    return [queue.resolved(settings) for queue in queues]


def forward_channels(policies: Policies, forward_fds: Sequence[ForwardFdArg], events_fds: Sequence[ForwardEventsFdArg],
                     taken: set[int]) -> list[FaultChannel]:
    """Peer channels from --forward-fd (and their event channels from --forward-events-fd), checked;
    raises UsageError. ``taken``: fds given to something else already."""
    seen: dict[str, int] = {}
    for arg in forward_fds:
        if arg.fd in taken:
            raise UsageError(f"--forward-fd {arg.fd}: that fd is given twice; a peer channel is its own socket")
        if arg.policy in seen:
            raise UsageError(f"--forward-fd {arg.fd}:{arg.policy}: policy {arg.policy!r} already forwards to "
                             f"fd {seen[arg.policy]}; a forward policy has one peer")
        taken.add(arg.fd)
        seen[arg.policy] = arg.fd
        _forward_policy(policies, arg.policy, f"--forward-fd {arg.fd}:{arg.policy}")
    events: dict[str, EventChannel] = {}
    for events_arg in events_fds:
        where = f"--forward-events-fd {events_arg.fd}:{events_arg.policy}"
        if events_arg.policy not in seen:
            raise UsageError(f"{where}: no --forward-fd N:{events_arg.policy} to go with it; vEVENTs go to the peer "
                             "of a fault channel")
        if events_arg.fd in taken or events_arg.policy in events:
            raise UsageError(f"{where}: that fd or policy is given twice")
        taken.add(events_arg.fd)
        events[events_arg.policy] = EventChannel(_channel_socket(events_arg.fd, where),
                                                 _forward_policy(policies, events_arg.policy, where),
                                                 name=f"fd {events_arg.fd}")
    channels = []
    for arg in forward_fds:
        where = f"--forward-fd {arg.fd}:{arg.policy}"
        channels.append(FaultChannel(_channel_socket(arg.fd, where), _forward_policy(policies, arg.policy, where),
                                     read_records=arg.read_records, name=f"fd {arg.fd}", events=events.get(arg.policy)))
    return channels


def _forward_policy(policies: Policies, name: str, where: str) -> ForwardPolicy:
    try:
        policy = policies.get(name)
    except PolicyError as exc:
        raise UsageError(f"{where}: {exc.lines[0][1]}") from None
    if not isinstance(policy, ForwardPolicy):
        raise UsageError(f"{where}: policy {name!r} is not of type forward; name a [policies] table with "
                         'type = "forward"')
    return policy


def _channel_socket(fd: int, where: str) -> socket.socket:
    try:
        return check_channel_socket(fd)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
