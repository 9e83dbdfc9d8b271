"""VFIO cdev devices (/dev/vfio/devices/vfioN): which there are, for the probe."""

from __future__ import annotations

import glob

DEVICES_GLOB = "/dev/vfio/devices/vfio*"


def list_devices() -> list[str]:
    return sorted(glob.glob(DEVICES_GLOB), key=lambda p: int(p.rsplit("vfio", 1)[1] or 0))
