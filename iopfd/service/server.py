"""The daemon: queues and policies from the config, then serve until SIGTERM/SIGINT, then a careful stop.

``prepare()`` does everything that can fail on bad input before anything is served (config errors
exit 78, a bad fault fd exits 2); ``Server.serve()`` runs the engine with systemd notification,
metrics and the watchdog, and on a signal: STOPPING=1, stop reading, grace for in-flight policies,
answer the rest with the deadline code, flush, exit 0.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import structlog

from iopfd.engine import Engine, QueueConfig, QueueServer
from iopfd.iommufd.errors import IommufdError
from iopfd.iommufd.fault import FaultQueue
from iopfd.policies import Policies, PolicyError
from iopfd.service.config import ConfigError, QueueSettings, ResolvedQueue, Settings
from iopfd.service.metrics import MetricsServer, registry_for
from iopfd.service.systemd import Notifier, run_watchdog, watchdog_interval

log = structlog.get_logger("iopfd.server")

STATUS_INTERVAL = 1.0  # seconds between STATUS= updates


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
        if not number.isdigit():
            raise ValueError(f"{text!r}: expected N or N:NAME, N an inherited file descriptor number")
        return cls(int(number), name or None)


def resolve_queues(settings: Settings, fault_fds: list[FaultFdArg]) -> list[ResolvedQueue]:
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
    if not queues:
        raise UsageError("no fault queue to serve: pass --fault-fd N[:NAME] (an fd inherited from the VMM) "
                         "or list [[queues]] with an fd in the config")
    missing = [(f"queues.{i}.fd", f"queue {q.name!r} has no fault fd; set fd or pass --fault-fd N:{q.name}")
               for i, q in enumerate(queues) if q.fd is None]
    if missing:
        raise ConfigError(missing)
    fds = [q.fd for q in queues]
    duplicated = sorted({fd for fd in fds if fds.count(fd) > 1})
    if duplicated:
        raise UsageError(f"fd {duplicated[0]} is given to more than one queue; one fault fd is one queue")
    return [queue.resolved(settings) for queue in queues]


def build_policies(settings: Settings) -> Policies:
    """Every policy table and the default policy, built now so that a bad table fails at start-up
    even when no queue uses it yet; raises PolicyError."""
    policies = Policies({name: (table.type, table.options) for name, table in settings.policies.items()})
    for name in sorted(settings.policies):
        policies.get(name, f"policies.{name}")
    policies.get(settings.policy, "policy")
    return policies


def prepare(settings: Settings, fault_fds: list[FaultFdArg]) -> Server:
    """Check and build everything; raises ConfigError, PolicyError or UsageError before serving."""
    queues = resolve_queues(settings, fault_fds)
    policies = build_policies(settings)
    engine = Engine()
    chosen = {queue.name: policies.get(queue.policy, f"queue {queue.name!r} policy") for queue in queues}
    for queue in queues:
        try:
            source = FaultQueue.from_fd(queue.fd)
        except IommufdError as exc:
            raise UsageError(f"queue {queue.name!r}: {exc}") from None
        engine.add(QueueServer(source, chosen[queue.name], QueueConfig(
            queue.name, queue.response_deadline, queue.deadline_code, queue.max_pending)))
    return Server(settings, engine)


class Server:
    def __init__(self, settings: Settings, engine: Engine, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.notifier = notifier or Notifier.from_environment()
        self.metrics: MetricsServer | None = None
        self._stop = asyncio.Event()

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("stopping", reason=reason)
            self._stop.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        endpoint = self.settings.metrics_endpoint
        if endpoint is not None:
            self.metrics = MetricsServer(registry_for(self.engine), *endpoint)
            log.info("metrics", address=f"http://{self.metrics.host}:{self.metrics.port}/metrics")
        helpers = [loop.create_task(self._report_status())]
        interval = watchdog_interval()
        if interval is not None:
            helpers.append(loop.create_task(run_watchdog(self.notifier, interval, self.healthy)))
        try:
            self.engine.start()
            self.notifier.ready()  # every queue is being read
            log.info("ready", queues=sorted(self.engine.queues))
            await self._stop.wait()
            self.notifier.stopping()
            await self.engine.stop(self.settings.shutdown_grace)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self.metrics is not None:
                self.metrics.close()
            for server in self.engine.queues.values():
                server.source.close()
            self.notifier.close()
        log.info("stopped", **self.engine.totals())
        return 0

    def healthy(self) -> bool:
        """What the watchdog vouches for: every queue still served."""
        return all(server.failure is None for server in self.engine.queues.values())

    def status(self) -> str:
        totals = self.engine.totals()
        answered = sum(totals[outcome] for outcome in ("success", "invalid", "deadline", "shed", "error"))
        return (f"{len(self.engine.queues)} queue(s), {answered} groups answered "
                f"({totals['success']} success, {totals['invalid']} invalid, {totals['deadline']} deadline, "
                f"{totals['shed']} shed, {totals['error']} error), {totals['pending']} pending")

    async def _report_status(self) -> None:
        if not self.notifier.enabled:
            return
        while True:
            self.notifier.status(self.status())
            await asyncio.sleep(STATUS_INTERVAL)


__all__ = ["ConfigError", "FaultFdArg", "PolicyError", "Server", "UsageError", "build_policies", "prepare", "resolve_queues"]
