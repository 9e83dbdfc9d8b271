"""The lab's lighter start path (iopfd_dev.forked): a forked ``iopfd run`` starts, inherits only what it
is given, takes an fd the way systemd passes it, finds plug-ins on PYTHONPATH, and stops cleanly, like
the exec'd command."""

from __future__ import annotations

import os
import socket

from iopfd_dev.daemon import spawn_daemon


def test_a_forked_daemon_inherits_only_its_fds_and_stops_cleanly(tmp_path):
    keep_r, keep_w = os.pipe()  # open here, not passed: the child must not hold it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(tmp_path / "control.sock"))
    listener.listen()
    plugins = tmp_path / "plugins"  # a plug-in package on PYTHONPATH, found through its entry point
    (plugins / "forked_probe-1.0.dist-info").mkdir(parents=True)
    (plugins / "forked_probe.py").write_text("from iopfd.policies import Policy\n\n"
                                             "class Probe(Policy):\n    def __init__(self, name):\n"
                                             "        self.name = name\n    async def decide(self, group):\n"
                                             "        return 0\n")
    (plugins / "forked_probe-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: forked-probe\nVersion: 1.0\n")
    (plugins / "forked_probe-1.0.dist-info" / "entry_points.txt").write_text(
        "[iopfd.policies]\nforked-probe = forked_probe:Probe\n")
    (tmp_path / "iopfd.toml").write_text('policy = "probe"\n[policies.probe]\ntype = "forked-probe"\n')
    env = {"IOPFD_RUNTIME_DIR": str(tmp_path), "IOPFD_WATCH_DEVICES": "false", "LISTEN_FDS": "1",
           "LISTEN_FDNAMES": "control", "PYTHONPATH": str(plugins)}
    try:
        daemon = spawn_daemon(tmp_path, (listener.fileno(),), "--metrics-address", "off",
                              "--config", str(tmp_path / "iopfd.toml"), env=env,
                              systemd_fd=listener.fileno(), forked=True)
        try:
            held = {os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")}
            assert f"pipe:[{os.fstat(keep_r).st_ino}]" not in held
            events = daemon.log_events()
            assert any(e["event"] == "control socket from systemd" and e["fd"] == 3 for e in events), events
            assert daemon.terminate() == 0
            assert daemon.totals()["pending"] == 0
        finally:
            daemon.close()
    finally:
        listener.close()
        os.close(keep_r)
        os.close(keep_w)
