"""A daemon ``Server`` with its control socket, in the test's own event loop, for host tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from iopfd.engine import Engine
from iopfd.policies import Policies
from iopfd.service.config import load_settings
from iopfd.service.control.transport import ControlSocket, bind_socket
from iopfd.service.server import Server
from iopfd.service.systemd import Notifier


async def start_server(tmp_path: Path, *, allowed_uids=None, **settings) -> tuple[Server, str, asyncio.Task]:
    """Serving once this returns; ``allowed_uids`` defaults to the test's own uid."""
    path = str(tmp_path / "control.sock")
    control = {"path": path, **settings.pop("control", {})}
    config = load_settings(None, control=control, **({"metrics_address": "off"} | settings))
    server = Server(config, Engine(), Policies.build_all(config.policy_tables, config.policy), Notifier(None))
    uids = {os.getuid()} if allowed_uids is None else set(allowed_uids)
    server.control = ControlSocket(server.control_state(), bind_socket(path, 0o660), allowed_uids=uids,
                                   allowed_gids=set(),
                                   owns_path=path)
    task = asyncio.create_task(server.serve())
    while not server.engine.running:
        await asyncio.sleep(0.001)
    return server, path, task


@asynccontextmanager
async def servers_in_loop(tmp_path: Path, **defaults) -> AsyncIterator:
    """Yields ``start(**settings) -> (server, path)``; every server started is stopped at exit and
    must exit 0."""
    running = []

    async def start(**settings):
        server, path, task = await start_server(tmp_path, **(defaults | settings))
        running.append((server, task))
        return server, path

    try:
        yield start
    finally:
        for server, task in running:
            server.request_stop()
            assert await asyncio.wait_for(task, 10) == 0
