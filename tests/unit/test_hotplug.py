"""Hot-unplug: recorded kernel uevents for vfio-dev devices detach the queues left without a device."""

from __future__ import annotations

import asyncio

import pytest
from pyroute2.netlink.uevent import MarshalUevent

from iopfd.engine import Engine
from iopfd.iommufd import INVALID
from iopfd.policies import Policies
from iopfd.service.config import load_settings
from iopfd.service.hotplug import DeviceWatcher, removed_device
from iopfd.service.metrics import registry_for
from iopfd.service.server import Server
from iopfd.service.systemd import Notifier
from iopfd_dev.emulated import EmulatedFaultQueue, PageRequest


def recorded(action: str, subsystem: str, name: str) -> dict:
    """A uevent as the kernel multicasts it (NUL-separated), parsed the way the watcher receives it."""
    devpath = f"/devices/pci0000:00/0000:00:03.0/{subsystem}/{name}"
    raw = (f"{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0"
           f"DEVNAME=vfio/devices/{name}\0SEQNUM=4242\0MAJOR=237\0MINOR=0\0").encode()
    (event,) = MarshalUevent().parse(raw)
    return event


def test_only_vfio_dev_removals_count():
    assert removed_device(recorded("remove", "vfio-dev", "vfio3")) == "vfio3"
    assert removed_device(recorded("add", "vfio-dev", "vfio3")) is None
    assert removed_device(recorded("remove", "block", "sda")) is None


def test_rescan_reports_known_devices_missing_from_sysfs(tmp_path):
    (tmp_path / "vfio0").mkdir()
    removed = []
    DeviceWatcher(removed.append, sysfs=str(tmp_path)).rescan({"vfio0", "vfio1", "vfio2"})
    assert removed == ["vfio1", "vfio2"]
    DeviceWatcher(removed.append, sysfs=str(tmp_path / "absent")).rescan({"vfio0"})
    assert removed[-1] == "vfio0"


@pytest.mark.asyncio
async def test_a_queue_is_detached_with_its_last_device_and_leaves_the_metrics():
    settings = load_settings(None, metrics_address="off", control={"path": "off"}, watch_devices=False,
                             shutdown_grace=0)
    server = Server(settings, Engine(), Policies({}), Notifier(None))
    emulated = EmulatedFaultQueue()
    server.queues.add("vm1", emulated.open(), policy="accept", device_names={4: "vfio0", 5: "vfio1"})
    server.engine.start()
    watcher = DeviceWatcher(server.device_removed)
    watcher.handle(recorded("remove", "vfio-dev", "vfio0"))
    assert "vm1" in server.engine.queues and dict(server.engine.queues["vm1"].config.device_names) == {5: "vfio1"}
    watcher.handle(recorded("remove", "vfio-dev", "vfio7"))  # not ours
    watcher.handle(recorded("remove", "vfio-dev", "vfio1"))
    async with asyncio.timeout(5):
        while "vm1" in server.engine.queues:
            await asyncio.sleep(0.001)
    text = "\n".join(f"{m.name} {s.labels}" for m in registry_for(server.engine).collect() for s in m.samples)
    assert "vm1" not in text
    emulated.report(PageRequest(dev_id=5, addr=0))  # nobody reads any more
    await asyncio.sleep(0.01)
    assert emulated.undelivered == 1 and INVALID not in [code for _, code in emulated.answers]
    emulated.close()
