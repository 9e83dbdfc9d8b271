"""The metrics beyond the engine's counters: process_* (fds held), iopfd_queues, iopfd_queue_reading
and iopfd_control_requests_total, read from the daemon's own endpoint."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iopfd import protocol
from iopfd.client import Client
from iopfd.protocol import ProtocolError
from iopfd_dev.emulated import EmulatedFaultFd, EmulatedFaultQueue, PageRequest
from server_in_loop import servers_in_loop


def scrape(server) -> dict[tuple[str, tuple], float]:
    """The daemon's /metrics, as (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scraped(server) -> dict[tuple[str, tuple], float]:
    return await asyncio.to_thread(scrape, server)


def request(path: str, op: str, **fields) -> str:
    """``op`` sent over the control socket; "ok" or the refusal's code."""
    with Client(path, timeout=10) as client:
        try:
            client.request(op, (), **fields)
        except ProtocolError as exc:
            return exc.code
    return "ok"


class FailingFd(EmulatedFaultFd):
    """A fault fd whose read() fails (a device gone bad): its queue stops being read."""

    def _readinto(self, buffer: bytearray) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.asyncio
async def test_process_metrics_count_the_fds_the_daemon_holds(tmp_path):
    async with servers_in_loop(tmp_path, metrics_address="127.0.0.1:0") as start:
        server, _ = await start()
        before = (await scraped(server))[("process_open_fds", ())]
        pipes = [os.pipe() for _ in range(20)]
        try:
            after = await scraped(server)
        finally:
            for pair in pipes:
                for fd in pair:
                    os.close(fd)
    # The previous scrape's connection may or may not be closed yet when the next one counts: +-1.
    assert abs(after[("process_open_fds", ())] - (before + 40)) <= 1
    assert after[("process_max_fds", ())] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert after[("process_resident_memory_bytes", ())] > 0
    assert after[("process_cpu_seconds_total", ())] > 0
    assert any(name == "python_info" for name, _ in after)
    assert ("python_gc_collections_total", (("generation", "0"),)) in after


@pytest.mark.asyncio
async def test_iopfd_queues_and_queue_reading_follow_the_queues(tmp_path):
    async with servers_in_loop(tmp_path, metrics_address="127.0.0.1:0") as start:
        server, _ = await start()
        assert (await scraped(server))[("iopfd_queues", ())] == 0
        good, bad = EmulatedFaultQueue(), EmulatedFaultQueue()
        server.queues.add("good", good.open())
        server.queues.add("bad", FailingFd(bad))
        bad.report(PageRequest(dev_id=1, addr=0x1000))  # readable: the read fails
        async with asyncio.timeout(10):
            while server.engine.queues["bad"].failure is None:
                await asyncio.sleep(0.001)
        samples = await scraped(server)
        assert samples[("iopfd_queues", ())] == 2
        assert samples[("iopfd_queue_reading", (("queue", "good"),))] == 1
        assert samples[("iopfd_queue_reading", (("queue", "bad"),))] == 0
        await server.queues.remove("bad")
        samples = await scraped(server)
        assert samples[("iopfd_queues", ())] == 1
        assert ("iopfd_queue_reading", (("queue", "bad"),)) not in samples
    good.close()
    bad.close()


@pytest.mark.asyncio
async def test_control_requests_are_counted_by_op_and_result(tmp_path):
    async with servers_in_loop(tmp_path, metrics_address="127.0.0.1:0") as start:
        server, path = await start()
        results = [await asyncio.to_thread(request, path, op, **fields) for op, fields in [
            ("status", {}), ("status", {}), ("detach", {"queue": "vm9"}), ("detach", {"queue": "no spaces"}),
            ("reboot", {}), ("forward", {"policy": "accept"}),
        ]]
        assert results == ["ok", "ok", "no-such-queue", "bad-request", "unknown-op", "not-a-forward-policy"]

        def garbage():
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(10)
                sock.connect(path)
                sock.send(b"not json")
                return protocol.decode(sock.recv(65536))["error"]["code"]

        assert await asyncio.to_thread(garbage) == "bad-request"
        samples = await scraped(server)
    counted = {labels: value for (name, labels), value in samples.items() if name == "iopfd_control_requests_total"}
    assert counted == {
        (("op", "status"), ("result", "ok")): 2,
        (("op", "detach"), ("result", "no-such-queue")): 1,
        (("op", "detach"), ("result", "bad-request")): 1,
        (("op", "unknown"), ("result", "unknown-op")): 1,
        (("op", "forward"), ("result", "not-a-forward-policy")): 1,
        (("op", "unknown"), ("result", "bad-request")): 1,  # not decodable: no op to name
    }


@pytest.mark.asyncio
async def test_a_refused_peer_is_counted_as_unauthorized(tmp_path):
    async with servers_in_loop(tmp_path, metrics_address="127.0.0.1:0") as start:
        server, path = await start(allowed_uids=[])
        assert await asyncio.to_thread(request, path, "status") == "unauthorized"
        samples = await scraped(server)
    assert samples[("iopfd_control_requests_total", (("op", "unknown"), ("result", "unauthorized")))] == 1
    assert not any(name == "iopfd_control_requests_total" and ("op", "status") in labels
                   for name, labels in samples)
