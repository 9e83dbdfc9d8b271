"""The daemon: queues and policies from the config, then serve until SIGTERM/SIGINT, then a careful stop.

``prepare()`` does everything that can fail on bad input before anything is served (config errors
exit 78, a bad fault fd exits 2); ``Server.serve()`` runs the engine with systemd notification,
metrics and the watchdog, and on a signal: STOPPING=1, stop reading, grace for in-flight policies,
answer the rest with the deadline code, flush, exit 0. SIGHUP reloads the policies and the defaults
from the config (``Server.reload``); every queue stays served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import resource
import signal
import socket
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from iopfd import protocol
from iopfd.engine import Engine, EventQueueServer, FixedPolicy, Policy, QueueConfig, QueueServer
from iopfd.engine.batch import np
from iopfd.iommufd import FaultQueue, Iommufd, IommufdError, VeventQueue
from iopfd.policies import ForwardPolicy, Policies, PolicyError
from iopfd.service.config import NAME_RULE, ConfigError, QueueSettings, ResolvedQueue, Settings, is_name
from iopfd.service.control import ControlServer, bind_socket
from iopfd.service.metrics import MetricsServer, registry_for
from iopfd.service.peer_channel import EventChannel, FaultChannel, check_channel_socket
from iopfd.service.recovery import FD_PREFIX, StateFile, sweep
from iopfd.service.systemd import Notifier, listen_fds, run_watchdog, watchdog_interval

log = structlog.get_logger("iopfd.server")

STATUS_INTERVAL = 1.0  # seconds between STATUS= updates
# Cookies swept for a stored queue the state file does not know: far above any pending count.
FALLBACK_SWEEP = 1 << 16
LATE_SLACK = 0.05  # seconds past response_deadline that --report counts as late


class UsageError(Exception):
    """Bad command-line input (exit 2), e.g. an fd that is not a fault fd."""


@dataclass(frozen=True)
class FaultFdArg:
    """``--fault-fd N[:NAME]``."""

    fd: int
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> FaultFdArg:
        number, _, name = text.partition(":")
        if not number.isdigit() or int(number) > MAX_FD:
            raise ValueError(f"{text!r}: expected N or N:NAME, N an inherited file descriptor number")
        if name and not is_name(name):
            raise ValueError(f"{text!r}: the queue name must be {NAME_RULE}")
        return cls(int(number), name or None)


MAX_FD = 2**31 - 1  # an int in the kernel


@dataclass(frozen=True)
class ForwardFdArg:
    """``--forward-fd N:POLICY[:RECORDS]``: the inherited socket N is the peer channel of the forward
    policy POLICY; the peer reads RECORDS fault records at once (default 256)."""

    fd: int
    policy: str
    read_records: int = protocol.DEFAULT_READ_RECORDS

    @classmethod
    def parse(cls, text: str) -> ForwardFdArg:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1]:
            raise ValueError(f"{text!r}: expected N:POLICY or N:POLICY:RECORDS, N an inherited socket's fd number")
        if len(parts) == 3 and not (parts[2].isdigit() and 1 <= int(parts[2]) <= protocol.MAX_READ_RECORDS):
            raise ValueError(f"{text!r}: RECORDS is how many fault records the peer reads at once, 1 to "
                             f"{protocol.MAX_READ_RECORDS}")
        if len(parts) == 2:
            return cls(int(parts[0]), parts[1])
        return cls(int(parts[0]), parts[1], int(parts[2]))


@dataclass(frozen=True)
class ForwardEventsFdArg:
    """``--forward-events-fd M:POLICY``: the inherited socket M carries POLICY's vEVENTs to its peer."""

    fd: int
    policy: str

    @classmethod
    def parse(cls, text: str) -> ForwardEventsFdArg:
        number, _, policy = text.partition(":")
        if not number.isdigit() or not policy:
            raise ValueError(f"{text!r}: expected M:POLICY, M an inherited socket's fd number")
        return cls(int(number), policy)


def resolve_queues(settings: Settings, fault_fds: list[FaultFdArg], *, allow_none: bool = False) -> list[ResolvedQueue]:
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
    fds = [q.fd for q in queues]
    duplicated = sorted({fd for fd in fds if fds.count(fd) > 1})
    if duplicated:
        raise UsageError(f"fd {duplicated[0]} is given to more than one queue; one fault fd is one queue")
    return [queue.resolved(settings) for queue in queues]


class _ReloadedPolicies(Policies):
    """Policies from a reloaded config, where the instances in ``kept`` (tables unchanged) are the
    running ones: a forward policy keeps its peer, ioas-map its bound queues."""

    def __init__(self, tables: Mapping[str, tuple[str, Mapping]], kept: Mapping[str, Policy]) -> None:
        super().__init__(tables)
        self._kept = dict(kept)

    def get(self, name: str, where: str = "policy") -> Policy:
        if name in self._kept:
            return self._kept[name]
        return super().get(name, where)


def build_policies(settings: Settings, kept: Mapping[str, Policy] | None = None) -> Policies:
    """Every policy table and the default policy, built now so that a bad table fails at start-up
    even when no queue uses it yet; raises PolicyError naming every broken table. ``kept``: running
    instances to reuse by name (a reload)."""
    tables = {name: (table.type, table.options) for name, table in settings.policies.items()}
    policies = _ReloadedPolicies(tables, kept) if kept else Policies(tables)
    problems: list[tuple[str, str]] = []
    named = [(name, f"policies.{name}") for name in sorted(settings.policies)]
    for name, where in [*named, (settings.policy, "policy")]:
        try:
            policies.get(name, where)
        except PolicyError as exc:
            problems += exc.lines
    if problems:
        # A table that refers to a broken one fails with the same lines: each is reported once.
        raise PolicyError(list(dict.fromkeys(problems)))
    if any(not isinstance(policy, FixedPolicy) for policy in policies.built()):
        np()  # the batch path's numpy, imported before READY=1 rather than on the first attach
    return policies


def unchanged_policies(old: Settings, new: Settings) -> set[str]:
    """Names whose table is the same in ``new`` as in ``old``, and so is every table it names (any
    string in its options that is a policy's name counts, which errs towards rebuilding)."""
    tables = {name: table.model_dump() for name, table in new.policies.items()}
    same = {name for name, table in tables.items()
            if name in old.policies and old.policies[name].model_dump() == table}
    while True:
        broken = {name for name in same if any(other in tables and other not in same
                                                for other in _strings(tables[name]))}
        if not broken:
            return same
        same -= broken


def _strings(value: object):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def prepare(settings: Settings, fault_fds: list[FaultFdArg], report_path: str | None = None,
            reload_settings: Callable[[], Settings] | None = None, *,
            forward_fds: list[ForwardFdArg] = (), forward_events_fds: list[ForwardEventsFdArg] = ()) -> Server:
    """Check and build everything; raises ConfigError, PolicyError or UsageError before serving.
    ``reload_settings`` loads the config again, for SIGHUP."""
    server = Server(settings, Engine(), build_policies(settings), report_path=report_path,
                    reload_settings=reload_settings)
    server.prepare_channels(forward_fds, forward_events_fds, taken={q.fd for q in fault_fds})
    passed = listen_fds()  # what systemd passed: the control socket and the fd store's fault fds
    taken_back = server.take_back_stored_queues(passed)
    queues = [queue for queue in resolve_queues(settings, fault_fds, allow_none=bool(taken_back))
              if queue.name not in taken_back]
    for queue in queues:
        server.policies.get(queue.policy, f"queue {queue.name!r} policy")
    for queue in queues:
        try:
            source = FaultQueue.from_fd(queue.fd)
        except IommufdError as exc:
            raise UsageError(f"queue {queue.name!r}: {exc}") from None
        server.add_queue(queue.name, source, policy=queue.policy)
    if settings.control.enabled:
        server.control = open_control_socket(server, passed.get("control"))
    return server


class Server:
    def __init__(self, settings: Settings, engine: Engine, policies: Policies,
                 notifier: Notifier | None = None, report_path: str | None = None,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.reload_settings = reload_settings  # SIGHUP: the config again (None: nothing to reload)
        self.report_path = report_path  # `iopfd run --report`: figures for `iopfd bench`, written at exit
        self.engine = engine
        self.policies = policies
        self.notifier = notifier or Notifier.from_environment()
        self.metrics: MetricsServer | None = None
        self.control: ControlServer | None = None
        self._keep_open: dict[str, Iommufd] = {}  # brokered queues: the iommufd iopfd opened for them
        # Queues a control peer attached or brokered -> its uid: only that uid (or an administrator)
        # may detach them. Queues from the config have no owner.
        self.owners: dict[str, int] = {}
        # The policy each queue was added with, None for "the default": what a reload resolves again.
        self._asked_policy: dict[str, str | None] = {}
        self.failed_tasks: list[str] = []  # background tasks that raised: the watchdog is no longer pinged
        self._stop = asyncio.Event()
        self.channels: set[FaultChannel] = set()  # forward peers' channels, open
        self._inherited_channels: list[FaultChannel] = []  # from --forward-fd, started by serve()
        self._background: set[asyncio.Task] = set()
        self._cpu_serving = 0.0  # CPU seconds from READY=1 to the last answer written at stop
        # Crash recovery needs systemd's fd store, so it is on exactly when systemd (or whoever owns
        # NOTIFY_SOCKET) listens.
        self.state = StateFile(settings.runtime_dir) if self.notifier.enabled else None

    def prepare_channels(self, forward_fds: list[ForwardFdArg], events_fds: list[ForwardEventsFdArg],
                         taken: set[int]) -> None:
        """Peer channels from --forward-fd (and their event channels from --forward-events-fd), checked;
        raises UsageError."""
        seen: dict[str, int] = {}
        for arg in forward_fds:
            if arg.fd in taken:
                raise UsageError(f"--forward-fd {arg.fd}: that fd is given twice; a peer channel is its own socket")
            if arg.policy in seen:
                raise UsageError(f"--forward-fd {arg.fd}:{arg.policy}: policy {arg.policy!r} already forwards to "
                                 f"fd {seen[arg.policy]}; a forward policy has one peer")
            taken.add(arg.fd)
            seen[arg.policy] = arg.fd
            self._forward_policy(arg.policy, f"--forward-fd {arg.fd}:{arg.policy}")
        events: dict[str, EventChannel] = {}
        for arg in events_fds:
            where = f"--forward-events-fd {arg.fd}:{arg.policy}"
            if arg.policy not in seen:
                raise UsageError(f"{where}: no --forward-fd N:{arg.policy} to go with it; vEVENTs go to the peer "
                                 "of a fault channel")
            if arg.fd in taken or arg.policy in events:
                raise UsageError(f"{where}: that fd or policy is given twice")
            taken.add(arg.fd)
            events[arg.policy] = EventChannel(self._channel_socket(arg.fd, where), self._forward_policy(arg.policy, where),
                                              name=f"fd {arg.fd}")
        for arg in forward_fds:
            where = f"--forward-fd {arg.fd}:{arg.policy}"
            self._inherited_channels.append(FaultChannel(
                self._channel_socket(arg.fd, where), self._forward_policy(arg.policy, where),
                read_records=arg.read_records, name=f"fd {arg.fd}", events=events.get(arg.policy)))

    def _forward_policy(self, name: str, where: str) -> ForwardPolicy:
        try:
            policy = self.policies.get(name)
        except PolicyError as exc:
            raise UsageError(f"{where}: {exc.lines[0][1]}") from None
        if not isinstance(policy, ForwardPolicy):
            raise UsageError(f"{where}: policy {name!r} is not of type forward; name a [policies] table with "
                             'type = "forward"')
        return policy

    @staticmethod
    def _channel_socket(fd: int, where: str):
        try:
            return check_channel_socket(fd)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None

    def forward_policies(self) -> dict[str, ForwardPolicy]:
        """The config's forward policies by name: their ``queued`` and ``stats`` are the peers' figures."""
        built = {name: self.policies.get(name) for name in self.settings.policies}
        return {name: policy for name, policy in built.items() if isinstance(policy, ForwardPolicy)}

    def add_channel(self, channel: FaultChannel) -> None:
        """Connect and start a forward peer's channel (RuntimeError: its policy has a peer); it is
        closed at exit if its peer has not closed it first."""
        channel.start()
        self.channels.add(channel)
        channel.on_close = self.channels.discard

    def take_back_stored_queues(self, passed: dict[str, list[int]]) -> set[str]:
        """Serve again the fault fds a previous life put in the fd store (``passed``: listen_fds()),
        after sweeping with INVALID the groups it read and never answered. Returns the names."""
        taken = set()
        for fd_name, fds in passed.items():
            if not fd_name.startswith(FD_PREFIX) or self.state is None:
                continue
            name = fd_name[len(FD_PREFIX):]
            try:
                source = FaultQueue.from_fd(fds[0])
            except IommufdError as exc:
                log.error("stored fd is not a fault fd; dropped", queue=name, error=str(exc))
                os.close(fds[0])
                self.notifier.remove_fd(fd_name)
                continue
            remembered = self.state.queues.get(name, {})
            policy = self._policy_for_taken_back(name, remembered.get("policy"))
            upto = remembered.get("cookie_mark") or FALLBACK_SWEEP
            swept = sweep(source, upto)
            log.info("fault queue taken back from the fd store", queue=name, swept_cookies=upto,
                     answered_invalid=swept)
            kept = {"labels": remembered.get("labels"), "stored": True, "owner_uid": remembered.get("owner_uid"),
                    "device_names": {int(k): v for k, v in (remembered.get("devices") or {}).items()}}
            try:
                self.add_queue(name, source, policy=policy, **kept)
            except PolicyError as exc:
                # ioas-map: the brokered iommufd died with the previous life. Failing the start would
                # leave every queue unserved; INVALID answers at least end this queue's faults.
                log.error("the queue's policy cannot serve it after a restart; answering INVALID until its peer "
                          "detaches it", queue=name, policy=policy, error=str(exc))
                self.add_queue(name, source, policy="reject", **kept)
            taken.add(name)
        return taken

    def _policy_for_taken_back(self, name: str, remembered: str | None) -> str:
        """The config's word first (it may have changed for this restart), then the previous life's."""
        configured = next((q.policy for q in self.settings.queues if q.name == name), None)
        for candidate in (configured, remembered):
            if candidate is None:
                continue
            try:
                self.policies.get(candidate)
                return candidate
            except PolicyError:
                log.warning("policy of a taken-back queue no longer exists; using the default", queue=name,
                            policy=candidate, default=self.settings.policy)
        return self.settings.policy

    def add_queue(self, name: str, source: FaultQueue, *, policy: str | None = None,
                  labels: Mapping[str, str] | None = None, device_names: Mapping[int, str] | None = None,
                  keep_open: Iommufd | None = None, stored: bool = False, owner_uid: int | None = None,
                  events: VeventQueue | None = None) -> QueueServer:
        """Serve ``source`` as ``name`` with the config's defaults (at once if already serving), and
        ``events``, a vEVENTQ, beside it with the same policy. The fault fd goes to systemd's fd store
        unless it came from there (``stored``); a vEVENTQ fd does not (it needs no sweep, and
        after a crash the queue comes back without it: its peer detaches and attaches again).
        ``owner_uid``: the control peer that attached it."""
        resolved = self._resolved(name, policy)
        try:  # first: a policy that cannot serve this queue (ioas-map without its iommufd) leaves nothing behind
            self.policies.get(resolved.policy).bind(name, keep_open)
        except ValueError as exc:
            raise PolicyError([(f"queue {name!r} policy", str(exc))]) from None
        queue = QueueServer(source, self.policies.get(resolved.policy), QueueConfig(
            name, resolved.response_deadline, resolved.deadline_code, resolved.max_pending,
            dict(labels or {}), dict(device_names or {})))
        self.engine.add(queue)
        if events is not None:
            self.engine.add_events(EventQueueServer(events, queue.policy, name, labels))
        if self.report_path is not None:
            queue.stats.latency_samples = array("d")
            queue.stats.answer_log = []
        if self.state is not None:
            if not stored:
                self.notifier.store_fd(source.fileno(), FD_PREFIX + name)
            self.state.remember(name, policy=policy, labels=dict(labels or {}),
                                devices={str(k): v for k, v in (device_names or {}).items()}, owner_uid=owner_uid)
            queue.cookie_mark = self.state.queues[name]["cookie_mark"]
            queue.cookie_mark_hook = lambda cookie: self.state.mark(name, cookie)
        if keep_open is not None:
            self._keep_open[name] = keep_open
        if owner_uid is not None:
            self.owners[name] = owner_uid
        self._asked_policy[name] = policy
        return queue

    async def remove_queue(self, name: str) -> QueueServer:
        """Stop serving ``name`` (answering all it read) and close its fd, and its vEVENTQ's."""
        events = self.engine.event_queues.get(name)
        queue = await self.engine.remove(name, self.settings.shutdown_grace)
        queue.policy.unbind(name)
        queue.source.close()
        if events is not None:
            events.source.close()
        if self.state is not None:
            self.notifier.remove_fd(FD_PREFIX + name)
            self.state.forget(name)
        if name in self._keep_open:
            self._keep_open.pop(name).close()
        self.owners.pop(name, None)
        self._asked_policy.pop(name, None)
        return queue

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            self._stop.set()  # first: nothing after it may keep the daemon from stopping
            log.info("stopping", reason=reason)

    def reload(self) -> bool:
        """SIGHUP: the config's policies, default policy and defaults (deadline, deadline code,
        max_pending) and its queues' own settings apply from now on, to every queue; groups already
        read finish with the policy that has them. Nothing else changes (sockets, metrics, logging).
        A config that does not load leaves everything as it was. True if it was applied."""
        if self.reload_settings is None:
            log.warning("reload requested, but iopfd runs without a config file; nothing to reload")
            return False
        try:
            loaded = self.reload_settings()
            kept = {name: self.policies.get(name) for name in unchanged_policies(self.settings, loaded)}
            policies = build_policies(loaded, kept)
        except (ConfigError, PolicyError) as exc:
            log.error("reload failed; the running configuration stays in force", problems=str(exc).splitlines())
            return False
        self.settings = self.settings.model_copy(update={key: getattr(loaded, key) for key in (
            "policy", "policies", "defaults", "queues", "shutdown_grace")})
        self.policies = policies
        configured = {queue.name for queue in self.settings.queues}
        for name, queue in self.engine.queues.items():
            # A queue of the config takes the config's (new) word; one a peer attached, the peer's.
            resolved = self._resolved(name, None if name in configured else self._asked_policy.get(name))
            self._switch_policy(queue, resolved.policy)
            queue.config = dataclasses.replace(queue.config, response_deadline=resolved.response_deadline,
                                               deadline_code=resolved.deadline_code, max_pending=resolved.max_pending)
        log.info("configuration reloaded", queues=sorted(self.engine.queues), policies=sorted(self.settings.policies),
                 kept_policies=sorted(kept))
        return True

    def _resolved(self, name: str, policy: str | None) -> ResolvedQueue:
        """Queue ``name``'s settings: ``policy`` if given, else its [[queues]] entry's (limits too), else
        the defaults."""
        entry = next((queue for queue in self.settings.queues if queue.name == name), None) or QueueSettings(name=name)
        return entry.model_copy(update={"policy": policy or entry.policy}).resolved(self.settings)

    def _switch_policy(self, queue: QueueServer, name: str) -> None:
        try:
            policy = self.policies.get(name)
            if policy is not queue.policy:
                policy.bind(queue.name, self._keep_open.get(queue.name))
        except (PolicyError, ValueError) as exc:
            log.error("after the reload the queue's policy cannot serve it; it keeps its previous policy",
                      queue=queue.name, policy=name, error=str(exc))
            return
        if policy is not queue.policy:
            queue.policy.unbind(queue.name)
            queue.use_policy(policy)

    def supervise(self, task: asyncio.Task, what: str) -> None:
        """Have ``task``'s exception, if it ends with one, logged and the watchdog pings stopped:
        a background task that died must not go unnoticed (systemd restarts a service that stops
        pinging, and the fd store keeps its queues)."""
        task.add_done_callback(lambda done: self._task_ended(done, what))

    def _task_ended(self, task: asyncio.Task, what: str) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.failed_tasks.append(what)
        log.error("background task failed; watchdog pings stop", task=what, exc_info=task.exception())

    async def serve(self) -> int:
        """Serve until a stop is requested; 0 then. Raises ConfigError (exit 78) when the metrics
        address cannot be listened on, after closing (and removing) the control socket."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        helpers: list[asyncio.Task] = []

        def helper(coroutine, what: str) -> None:
            helpers.append(task := loop.create_task(coroutine))
            self.supervise(task, what)

        try:
            self._start_metrics()
            for channel in self._inherited_channels:
                self.add_channel(channel)
            if self.control is not None:
                self.control.start()
            helper(self._report_status(), "status updates")
            if self.settings.watch_devices:
                # Imported only when needed: pyroute2 imports all of itself, 60 % of start-up in the lab.
                from iopfd.service.hotplug import DeviceWatcher

                watcher = DeviceWatcher(self.device_removed)
                watcher.rescan(self.known_devices())
                helper(self._watch(watcher), "device watcher")
            interval = watchdog_interval()
            if interval is not None:
                helper(run_watchdog(self.notifier, interval, self.healthy), "watchdog")
            self.engine.start()
            self.notifier.ready()  # every queue is being read
            cpu_at_ready = _cpu_seconds()
            log.info("ready", queues=sorted(self.engine.queues))
            await self._stop.wait()
            self.notifier.stopping()
            await self.engine.stop(self.settings.shutdown_grace)
            self._cpu_serving = _cpu_seconds() - cpu_at_ready
        finally:
            for channel in list(self.channels):  # after the engine: every group is answered already
                channel.close()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, *self._background, return_exceptions=True)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if self.control is not None:
                await self.control.close()
            if self.metrics is not None:
                self.metrics.close()
            for server in (*self.engine.queues.values(), *self.engine.event_queues.values()):
                server.source.close()
            for ctx in self._keep_open.values():
                ctx.close()
            self.notifier.close()
        log.info("stopped", **self.engine.totals())
        if self.report_path is not None:
            Path(self.report_path).write_text(json.dumps(self.report()))
        return 0

    def _start_metrics(self) -> None:
        endpoint = self.settings.metrics_endpoint
        if endpoint is None:
            return
        host, port = endpoint
        try:
            requests = self.control.requests if self.control is not None else None
            self.metrics = MetricsServer(registry_for(self.engine, requests, self.forward_policies), host, port)
        except OSError as exc:
            raise ConfigError([("metrics_address", _listen_problem(host, port, exc))]) from None
        log.info("metrics", address=f"http://{self.metrics.host}:{self.metrics.port}/metrics")

    def report(self) -> dict:
        """What each queue and all together did, with latency percentiles, this process's CPU time
        while serving (from READY=1 to the last answer at stop: neither start-up imports nor this
        report's own sorting) and peak RSS."""
        queues = {}
        every: list[float] = []
        late = 0
        for name, queue in self.engine.queues.items():
            stats = queue.stats
            samples = sorted(stats.latency_samples or ())
            every += samples
            # answered later than the deadline allows, with 50 ms for timer and write
            queue_late = len(samples) - bisect_right(samples, queue.config.response_deadline + LATE_SLACK)
            late += queue_late
            queues[name] = {"outcomes": stats.outcomes, "faults": stats.faults, "write_errors": stats.write_errors,
                            "first_read": stats.first_read, "last_write": stats.last_write, "late": queue_late,
                            "latency": _percentiles(samples),
                            "answered_at": [[int(addr), at] for addrs, at in stats.answer_log or ()
                                            for addr in list(addrs)]}
        every.sort()
        return {"queues": queues, "cpu_seconds": self._cpu_serving,
                "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "overall": {"late": late, "latency": _percentiles(every),
                            "cdf": [every[int(i / 100 * (len(every) - 1))] for i in range(101)] if every else []}}

    def device_removed(self, device: str) -> None:
        """A VFIO device is gone: forget it; a queue left without devices is detached (its groups
        answered, its fd closed, its metrics gone)."""
        for name, queue in list(self.engine.queues.items()):
            names = queue.config.device_names
            gone = [dev_id for dev_id, value in names.items() if value == device]
            if not gone:
                continue
            for dev_id in gone:
                del names[dev_id]
            if not names:
                log.info("last device of the queue removed; detaching it", queue=name, device=device)
                task = asyncio.get_running_loop().create_task(self.remove_queue(name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                self.supervise(task, f"detach of queue {name!r}")

    def known_devices(self) -> set[str]:
        return {device for queue in self.engine.queues.values() for device in queue.config.device_names.values()}

    def healthy(self) -> bool:
        """What the watchdog vouches for: no background task failed, and every queue still served."""
        return not self.failed_tasks and all(server.failure is None for server in (*self.engine.queues.values(),
                                                          *self.engine.event_queues.values()))

    def status(self) -> str:
        totals = self.engine.totals()
        answered = sum(totals[outcome] for outcome in ("success", "invalid", "deadline", "shed", "error"))
        return (f"{len(self.engine.queues)} queue(s), {answered} groups answered "
                f"({totals['success']} success, {totals['invalid']} invalid, {totals['deadline']} deadline, "
                f"{totals['shed']} shed, {totals['error']} error), {totals['pending']} pending")

    async def _watch(self, watcher) -> None:
        try:
            await watcher.run()
        except OSError as exc:  # e.g. netlink not permitted in a container
            log.warning("cannot watch device uevents; hot-unplugged devices keep their queues", error=str(exc))

    async def _report_status(self) -> None:
        if not self.notifier.enabled:
            return
        while True:
            self.notifier.status(self.status())
            await asyncio.sleep(STATUS_INTERVAL)


def open_control_socket(server: Server, inherited: list[int] | None) -> ControlServer:
    """The socket systemd passed (iopfd.socket, FileDescriptorName=control), else bind [control] path."""
    settings = server.settings.control
    allowed = {"allowed_uids": {*settings.allowed_uids, os.getuid()}, "allowed_gids": set(settings.allowed_gids)}
    if inherited:
        listener = socket.socket(fileno=inherited[0])
        log.info("control socket from systemd", fd=inherited[0])
        return ControlServer(server, listener, **allowed)
    try:
        listener = bind_socket(settings.path, settings.mode)
    except OSError as exc:
        raise UsageError(f"control socket {settings.path}: {exc}; set [control] path, or path = \"off\"") from None
    log.info("control socket", path=settings.path, mode=oct(settings.mode))
    return ControlServer(server, listener, owns_path=settings.path, **allowed)


def _listen_problem(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r} ({exc.strerror}); use an IP address, e.g. 127.0.0.1:{port}, or off"
    if exc.errno == errno.EADDRINUSE:
        return f"{where} is already in use (another iopfd?); choose a free port, or off"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this host; use one of its addresses (127.0.0.1, 0.0.0.0), or off"
    if exc.errno == errno.EACCES:
        return f"listening on {where} is not permitted (ports below 1024 need privileges); use a port from 1024 up"
    return f"cannot listen on {where}: {exc.strerror or exc}; fix the address, or off"


def _percentiles(ordered: list[float]) -> dict:
    return {f"p{q * 100:g}": ordered[int(q * (len(ordered) - 1))] if ordered else None
            for q in (0.5, 0.99, 0.999, 1.0)} | {"count": len(ordered)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


__all__ = ["ConfigError", "FaultFdArg", "ForwardEventsFdArg", "ForwardFdArg", "PolicyError", "Server", "UsageError", "build_policies", "prepare", "resolve_queues"]
