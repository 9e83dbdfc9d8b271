"""The daemon: serve its queues until SIGTERM/SIGINT, then a careful stop.

``Server.serve()`` is ``startup()`` (signals, the metrics endpoint, the peer channels of
``--forward-fd``, the control socket, status updates, the device watcher, the watchdog, every queue
read, READY=1), ``main_loop()`` (until a stop is requested) and ``shutdown()`` (STOPPING=1, stop
reading, grace for in-flight policies, answer the rest with the deadline code, flush, close
everything), then 0. SIGHUP reloads the policies and the defaults from the config (``reload``);
every queue stays served. The queues themselves are the registry's (``queues``); everything checked
before serving is ``iopfd.service.prepare``'s.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from iopfd.engine import Engine
from iopfd.engine.stats import OUTCOMES
from iopfd.policies import Policies, Policy, PolicyError
from iopfd.policies.registry import unchanged
from iopfd.service.config import ConfigError, Settings
from iopfd.service.control.ops import ControlState
from iopfd.service.control.transport import ControlSocket
from iopfd.service.metrics import MetricsEndpoint, registry_for
from iopfd.service.peer_channel import FaultChannel
from iopfd.service.queues import QueueRegistry
from iopfd.service.systemd import Notifier, run_watchdog, watchdog_interval

log = structlog.get_logger("iopfd.server")

STATUS_INTERVAL = 1.0  # seconds between STATUS= updates


class Server:
    def __init__(self, settings: Settings, engine: Engine, policies: Policies,
                 notifier: Notifier | None = None, reload_settings: Callable[[], Settings] | None = None,
                 channels: Sequence[FaultChannel] = ()) -> None:
        self.reload_settings = reload_settings  # SIGHUP: the config again (None: nothing to reload)
        self.engine = engine
        self.notifier = notifier or Notifier.from_environment()
        self.queues = QueueRegistry(engine, settings, policies, self.notifier)
        self.metrics: MetricsEndpoint | None = None
        self.control: ControlSocket | None = None
        self.failed_tasks: list[str] = []  # background tasks that raised: the watchdog is no longer pinged
        self._stop = asyncio.Event()
        self.channels: set[FaultChannel] = set()  # forward peers' channels, open
        self._inherited_channels = list(channels)  # from --forward-fd, connected by startup()
        self._helpers: list[asyncio.Task] = []  # status updates, device watcher, watchdog: cancelled at shutdown
        self._background: set[asyncio.Task] = set()  # detaches after a hot-unplug

    @property
    def settings(self) -> Settings:
        """The settings in force (a reload replaces them)."""
        return self.queues.settings

    @property
    def policies(self) -> Policies:
        """The policies in force (a reload replaces them)."""
        return self.queues.policies

    def control_state(self) -> ControlState:
        """What the control socket may use of the daemon."""
        return ControlState(self.queues, self.settings.control.max_queues, self.add_channel, self.supervise)

    def configured_policies(self) -> dict[str, Policy]:
        """The policies of the config's [policies] tables by name, as they are now (the metrics read
        the forward peers' and ioas-map's figures from them)."""
        return {name: self.policies.get(name) for name in self.settings.policies}

    def add_channel(self, channel: FaultChannel) -> None:
        """Connect and start a forward peer's channel (RuntimeError: its policy has a peer); it is
        closed at exit if its peer has not closed it first."""
        channel.start()
        self.channels.add(channel)
        channel.on_close = self.channels.discard

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
            kept = {name: self.policies.get(name)
                    for name in unchanged(self.settings.policy_tables, loaded.policy_tables)}
            policies = Policies.build_all(loaded.policy_tables, loaded.policy, kept)
        except (ConfigError, PolicyError) as exc:
            log.error("reload failed; the running configuration stays in force", problems=str(exc).splitlines())
            return False
        settings = self.settings.model_copy(update={key: getattr(loaded, key) for key in (
            "policy", "policies", "defaults", "queues", "shutdown_grace")})
        self.queues.reconfigure(settings, policies)
        log.info("configuration reloaded", queues=sorted(served.name for served in self.queues),
                 policies=sorted(settings.policies), kept_policies=sorted(kept))
        return True

    async def serve(self) -> int:
        """Serve until a stop is requested; 0 then. Raises ConfigError (exit 78) when the metrics
        address cannot be listened on, after closing (and removing) the control socket."""
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()
        log.info("stopped", **self.engine.totals())
        return 0

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._start_metrics()
        for channel in self._inherited_channels:
            self.add_channel(channel)
        if self.control is not None:
            self.control.start()
        self._helper(self._report_status(), "status updates")
        if self.settings.watch_devices:
            # Imported only when needed: pyroute2 imports all of itself, 60 % of start-up in the lab.
            from iopfd.service.hotplug import DeviceWatcher

            watcher = DeviceWatcher(self.device_removed)
            watcher.rescan(self.queues.devices())
            self._helper(self._watch(watcher), "device watcher")
        interval = watchdog_interval()
        if interval is not None:
            self._helper(run_watchdog(self.notifier, interval, self.healthy), "watchdog")
        self.engine.start()
        self.notifier.ready()  # every queue is being read
        log.info("ready", queues=sorted(self.engine.queues))

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Answer everything read (if serving began), then close everything startup() opened, in
        whatever part it got to."""
        if self.engine.running:
            self.notifier.stopping()
            await self.engine.stop(self.settings.shutdown_grace)
        for channel in list(self.channels):  # after the engine: every group is answered already
            channel.close()
        for task in self._helpers:
            task.cancel()
        await asyncio.gather(*self._helpers, *self._background, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.queues.close()
        self.notifier.close()

    def _helper(self, coroutine: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._helpers.append(task)
        self.supervise(task, what)

    def _start_metrics(self) -> None:
        endpoint = self.settings.metrics_endpoint
        if endpoint is None:
            return
        host, port = endpoint
        try:
            requests = self.control.requests if self.control is not None else None
            self.metrics = MetricsEndpoint(registry_for(self.engine, requests, self.configured_policies), host, port)
        except OSError as exc:
            raise ConfigError([("metrics_address", _listen_problem(host, port, exc))]) from None
        log.info("metrics", address=f"http://{self.metrics.host}:{self.metrics.port}/metrics")

    def device_removed(self, device: str) -> None:
        """A VFIO device is gone: forget it; a queue left without devices is detached (its groups
        answered, its fd closed, its metrics gone)."""
        for name in self.queues.forget_device(device):
            log.info("last device of the queue removed; detaching it", queue=name, device=device)
            task = asyncio.get_running_loop().create_task(self.queues.remove(name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            self.supervise(task, f"detach of queue {name!r}")

    def healthy(self) -> bool:
        """What the watchdog vouches for: no background task failed, and every queue still served."""
        return not self.failed_tasks and self.engine.healthy

    def status(self) -> str:
        totals = self.engine.totals()
        return (f"{len(self.engine.queues)} queue(s), {sum(totals[outcome] for outcome in OUTCOMES)} groups "
                f"answered ({', '.join(f'{totals[outcome]} {outcome}' for outcome in OUTCOMES)}), "
                f"{totals['pending']} pending")

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

