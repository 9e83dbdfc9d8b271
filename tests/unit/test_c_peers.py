"""The C peers against the daemon's peer channel on the host: bench/peer.c on a socketpair, and the
complete C peer of docs/protocol.md (compiled from the page) through the control socket's forward."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
from pathlib import Path

import numpy
import pytest
from test_peer_channel import Engine, until

from iopfd.iommufd.fault import SUCCESS
from iopfd.policies import ForwardPolicy
from iopfd.service.peer_channel import FaultChannel
from server_in_loop import servers_in_loop

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.asyncio


def compile_c(source: Path, binary: Path) -> str:
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(source)], check=True)
    return str(binary)


def docs_c_peer() -> str:
    """The C block of docs/protocol.md that is a whole program."""
    blocks = re.findall(r"```c\n(.*?)```", (ROOT / "docs" / "protocol.md").read_text(), re.S)
    (program,) = [block for block in blocks if "int main(" in block]
    return program


async def test_the_bench_peer_answers_every_group_over_a_channel(tmp_path):
    peer = compile_c(ROOT / "tooling" / "iopfd_dev" / "bench" / "c" / "peer.c", tmp_path / "peer")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    policy = ForwardPolicy("vmm")
    channel = FaultChannel(ours, policy, read_records=100)  # as QEMU's PRQ reader reads: 100 records
    channel.start()
    process = await asyncio.create_subprocess_exec(peer, str(theirs.fileno()), "100", pass_fds=[theirs.fileno()],
                                                   stdout=subprocess.PIPE)
    theirs.close()
    engine = Engine()
    sizes = [1] * 200 + [3, 1, 2, 1] * 50
    batches = [engine.batch(sizes, first_cookie=1 + len(sizes) * i) for i in range(100)]  # 40 000 groups
    for batch in batches:
        policy.decide_batch(batch)
    await until(lambda: len(engine.answers) == 40_000, timeout=60)
    assert set(engine.answers.values()) == {SUCCESS} and policy.stats.late_answers == 0
    assert policy.stats.oversized == 0 and channel.queued == 0
    channel.close()  # the peer sees the end of the channel and reports
    out, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0
    report = json.loads(out)
    assert report["groups"] == 40_000 and report["packets"] >= 40_000 * 1.25 / 100


async def test_the_c_peer_in_the_protocol_docs_compiles_and_serves_a_forward_policy(tmp_path):
    source = tmp_path / "docs_peer.c"
    source.write_text(docs_c_peer())
    peer = compile_c(source, tmp_path / "docs_peer")
    async with servers_in_loop(tmp_path, watch_devices=False, policies={"vmm": {"type": "forward"}}) as start:
        server, path = await start()
        policy = server.policies.get("vmm")
        process = await asyncio.create_subprocess_exec(peer, path, "vmm", stdout=subprocess.PIPE)
        await until(lambda: policy.channel is not None, timeout=10)
        assert policy.channel.read_records == 256
        engine = Engine()
        for i in range(20):
            policy.decide_batch(engine.batch([1, 2, 1, 5] * 50, first_cookie=1 + 200 * i))
        await until(lambda: len(engine.answers) == 4000, timeout=30)
        assert numpy.unique(list(engine.answers.values())).tolist() == [SUCCESS]
        policy.channel.close()
        out, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0 and out == b"answered 4000 groups\n"
