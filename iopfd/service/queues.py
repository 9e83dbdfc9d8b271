"""The queues the daemon serves: one record each, and the adding, removing and taking back of queues.

A record (``ServedQueue``) holds everything iopfd keeps for one served queue: the responder of its
fault queue, the reader of its vEVENTQ, the iommufd iopfd opened for it (brokered queues), the uid
of the control peer that attached it, whether its fault fd is in systemd's fd store, and the policy
it was asked for. ``QueueRegistry`` adds a queue (its policy bound, the engine serving it, its fd in
the fd store and the state file), removes it (each of those undone), takes back at start the queues
a previous life left in the fd store, and applies a reload to every queue.

The registry holds the settings and policies queues are added with; a reload replaces both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import structlog

from iopfd.engine import Engine, EventQueueReader, Policy, QueueConfig, QueueResponder
from iopfd.iommufd import FaultQueue, Iommufd, IommufdError, VeventQueue
from iopfd.policies import Policies, PolicyError
from iopfd.service.config import QueueSettings, ResolvedQueue, Settings
from iopfd.service.recovery import FD_PREFIX, StateFile, sweep
from iopfd.service.systemd import Notifier

log = structlog.get_logger("iopfd.queues")

# Cookies swept for a stored queue the state file does not know: far above any pending count.
FALLBACK_SWEEP = 1 << 16


@dataclass(eq=False)
class ServedQueue:
    """One served queue and everything iopfd holds for it."""

    queue: QueueResponder
    events: EventQueueReader | None  # the vEVENTQ attached with the fault fd, read under the same name
    iommufd: Iommufd | None  # the iommufd iopfd opened for a brokered queue, handed to the peer too
    owner_uid: int | None  # the control peer that attached or brokered it (it may detach it); None: the config's
    asked_policy: str | None  # the policy it was added with; None: the default, resolved again on a reload
    stored: bool  # its fault fd is in systemd's fd store (and the state file knows it)

    @property
    def name(self) -> str:
        return self.queue.name

    @property
    def devices(self) -> Mapping[int, str]:
        """dev_id -> VFIO device name, from ``attach``: a queue is detached with its last device."""
        return self.queue.config.device_names


class QueueRegistry:
    """Every served queue by name, with the settings and policies new queues get."""

    def __init__(self, engine: Engine, settings: Settings, policies: Policies, notifier: Notifier) -> None:
        self.engine = engine
        self.settings = settings
        self.policies = policies
        self.notifier = notifier
        # Crash recovery needs systemd's fd store, so it is on exactly when systemd (or whoever owns
        # NOTIFY_SOCKET) listens.
        self.state = StateFile(settings.runtime_dir) if notifier.enabled else None
        self._served: dict[str, ServedQueue] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._served

    def __getitem__(self, name: str) -> ServedQueue:
        return self._served[name]

    def __iter__(self) -> Iterator[ServedQueue]:
        return iter(list(self._served.values()))

    def __len__(self) -> int:
        return len(self._served)

    def policy(self, name: str | None) -> Policy:
        """The policy called ``name``, or the configured default; raises PolicyError."""
        return self.policies.get(self.settings.policy if name is None else name)

    def resolved(self, name: str, policy: str | None) -> ResolvedQueue:
        """Queue ``name``'s settings: ``policy`` if given, else its [[queues]] entry's (limits too), else
        the defaults."""
        entry = next((queue for queue in self.settings.queues if queue.name == name), None) or QueueSettings(name=name)
        return entry.model_copy(update={"policy": policy or entry.policy}).resolved(self.settings)

    def add(self, name: str, source: FaultQueue, *, policy: str | None = None,
            labels: Mapping[str, str] | None = None, device_names: Mapping[int, str] | None = None,
            iommufd: Iommufd | None = None, stored: bool = False, owner_uid: int | None = None,
            events: VeventQueue | None = None) -> ServedQueue:
        """Serve ``source`` as ``name`` (at once if the engine runs), and ``events``, a vEVENTQ, beside
        it with the same policy. The fault fd goes to systemd's fd store unless it came from there
        (``stored``); a vEVENTQ fd does not (it needs no sweep, and after a crash the queue comes back
        without it: its peer detaches and attaches again). Raises PolicyError, with nothing added,
        when the policy cannot serve this queue (ioas-map without its iommufd)."""
        resolved = self.resolved(name, policy)
        chosen = self.policies.get(resolved.policy)
        try:
            chosen.bind(name, iommufd)
        except ValueError as exc:
            raise PolicyError([(f"queue {name!r} policy", str(exc))]) from None
        queue = QueueResponder(source, chosen, QueueConfig(
            name, resolved.response_deadline, resolved.deadline_code, resolved.max_pending,
            dict(labels or {}), dict(device_names or {})))
        self.engine.add(queue)
        reader = None
        if events is not None:
            reader = EventQueueReader(events, chosen, name, labels)
            self.engine.add_events(reader)
        state = self.state
        if state is not None:
            if not stored:
                self.notifier.store_fd(source.fileno(), FD_PREFIX + name)
            state.remember(name, policy=policy, labels=dict(labels or {}),
                           devices={str(k): v for k, v in (device_names or {}).items()}, owner_uid=owner_uid)
            queue.cookie_mark = state.queues[name]["cookie_mark"]
            queue.cookie_mark_hook = lambda cookie: state.mark(name, cookie)
        served = ServedQueue(queue, reader, iommufd, owner_uid, policy, stored=state is not None)
        self._served[name] = served
        return served

    async def remove(self, name: str) -> ServedQueue:
        """Stop serving ``name`` (answering all it read) and close its fds: the fault fd, the vEVENTQ's
        and the brokered iommufd."""
        served = self._served[name]
        await self.engine.remove(name, self.settings.shutdown_grace)
        del self._served[name]
        served.queue.policy.unbind(name)
        if served.stored:
            self.notifier.remove_fd(FD_PREFIX + name)
        if self.state is not None:
            self.state.forget(name)
        self._close(served)
        return served

    def close(self) -> None:
        """Close every queue's fds (the engine has stopped: everything read is answered)."""
        for served in self._served.values():
            self._close(served)

    @staticmethod
    def _close(served: ServedQueue) -> None:
        served.queue.source.close()
        if served.events is not None:
            served.events.source.close()
        if served.iommufd is not None:
            served.iommufd.close()

    def take_back(self, passed: Mapping[str, list[int]]) -> set[str]:
        """Serve again the fault fds a previous life put in the fd store (``passed``: listen_fds()),
        after sweeping with INVALID the groups it read and never answered. Returns the names."""
        taken = set()
        for fd_name, fds in passed.items():
            if not fd_name.startswith(FD_PREFIX) or self.state is None:
                continue
            name = fd_name[len(FD_PREFIX):]
            try:
                source = FaultQueue.adopt(fds[0])
            except IommufdError as exc:
                log.error("stored fd is not a fault fd; dropped", queue=name, error=str(exc))
                os.close(fds[0])
                self.notifier.remove_fd(fd_name)
                continue
            remembered = self.state.queues.get(name, {})
            policy = self._policy_for_taken_back(name, remembered.get("policy"))
            upto = StateFile.sweep_limit(remembered.get("cookie_mark") or FALLBACK_SWEEP, source.buffer_records)
            swept = sweep(source, upto)
            log.info("fault queue taken back from the fd store", queue=name, swept_cookies=upto,
                     answered_invalid=len(swept))
            labels = remembered.get("labels")
            devices = {int(k): v for k, v in (remembered.get("devices") or {}).items()}
            owner_uid = remembered.get("owner_uid")
            try:
                self.add(name, source, policy=policy, labels=labels, device_names=devices, stored=True,
                         owner_uid=owner_uid)
            except PolicyError as exc:
                # ioas-map: the brokered iommufd died with the previous life. Failing the start would
                # leave every queue unserved; INVALID answers at least end this queue's faults.
                log.error("the queue's policy cannot serve it after a restart; answering INVALID until its peer "
                          "detaches it", queue=name, policy=policy, error=str(exc))
                self.add(name, source, policy="reject", labels=labels, device_names=devices, stored=True,
                         owner_uid=owner_uid)
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

    def reconfigure(self, settings: Settings, policies: Policies) -> None:
        """A reload: ``settings`` and ``policies`` apply from now on, to every queue (groups already
        read finish with the policy that has them)."""
        self.settings = settings
        self.policies = policies
        configured = {queue.name for queue in settings.queues}
        for served in self:
            # A queue of the config takes the config's (new) word; one a peer attached, the peer's.
            queue = served.queue
            resolved = self.resolved(served.name, None if served.name in configured else served.asked_policy)
            self._switch_policy(served, resolved.policy)
            queue.config = dataclasses.replace(queue.config, response_deadline=resolved.response_deadline,
                                               deadline_code=resolved.deadline_code, max_pending=resolved.max_pending)

    def _switch_policy(self, served: ServedQueue, name: str) -> None:
        queue = served.queue
        try:
            policy = self.policies.get(name)
            if policy is not queue.policy:
                policy.bind(queue.name, served.iommufd)
        except (PolicyError, ValueError) as exc:
            log.error("after the reload the queue's policy cannot serve it; it keeps its previous policy",
                      queue=queue.name, policy=name, error=str(exc))
            return
        if policy is not queue.policy:
            queue.policy.unbind(queue.name)
            queue.use_policy(policy)

    def forget_device(self, device: str) -> list[str]:
        """A VFIO device is gone: forget it wherever it served; returns the queues it leaves without a
        device (the caller detaches them)."""
        emptied = []
        for served in self:
            names = served.devices
            if device not in names.values():
                continue
            queue = served.queue
            left = {dev_id: value for dev_id, value in names.items() if value != device}
            queue.config = dataclasses.replace(queue.config, device_names=left)
            if not left:
                emptied.append(served.name)
        return emptied

    def devices(self) -> set[str]:
        """Every VFIO device a served queue knows."""
        return {device for served in self for device in served.devices.values()}
