"""Device hot-plug: when a VFIO cdev device goes away, the queues that served only it go too.

Kernel uevents (NETLINK_KOBJECT_UEVENT, through pyroute2) for the ``vfio-dev`` subsystem name the
device (``vfio0`` as in /dev/vfio/devices/vfio0). Queues know their devices from the ``devices`` map
of ``attach`` (dev_id -> name). At start a rescan of /sys/class/vfio-dev catches removals missed
while iopfd was down.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import structlog
from pyroute2.netlink.uevent import MONITOR_GROUP_KERNEL, AsyncUeventSocket  # slow: imported only when watching

log = structlog.get_logger("iopfd.hotplug")
SYSFS_CLASS = "/sys/class/vfio-dev"
SUBSYSTEM = "vfio-dev"


def removed_device(event: Mapping[str, str]) -> str | None:
    """The vfio-dev device name a ``remove`` uevent is about, or None for any other event."""
    if event.get("SUBSYSTEM") != SUBSYSTEM or event.get("ACTION") != "remove":
        return None
    path = event.get("DEVNAME") or event.get("DEVPATH") or ""
    return os.path.basename(path) or None


def present_devices(sysfs: str = SYSFS_CLASS) -> set[str]:
    try:
        return set(os.listdir(sysfs))
    except FileNotFoundError:  # no VFIO cdev support loaded: no device is present
        return set()


class DeviceWatcher:
    """Calls ``on_removed(name)`` for every vfio-dev device that disappears."""

    def __init__(self, on_removed: Callable[[str], None], sysfs: str = SYSFS_CLASS) -> None:
        self.on_removed = on_removed
        self.sysfs = sysfs

    def rescan(self, known: set[str]) -> None:
        for name in sorted(known - present_devices(self.sysfs)):
            log.info("device gone while iopfd was not watching", device=name)
            self.on_removed(name)

    def handle(self, event: Mapping[str, str]) -> None:
        name = removed_device(event)
        if name is not None:
            log.info("device removed", device=name, devpath=event.get("DEVPATH"))
            self.on_removed(name)

    async def run(self) -> None:
        sock = AsyncUeventSocket()
        try:
            await sock.bind(groups=MONITOR_GROUP_KERNEL)
            async for event in sock.get():
                self.handle(event)
        finally:
            sock.close()
