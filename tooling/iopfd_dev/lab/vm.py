"""Boot a lab kernel under QEMU (virtme-ng, TCG: KVM hangs on these hosts) and run a command in it.

The guest sees the host's root filesystem read-only over 9p, so it runs this checkout and its
virtualenv unmodified. One directory is shared read-write for results.

Two boots: the normal one (virtme-ng's own init as PID 1 runs the command), and the systemd boot
(``systemd=True``), where the host's systemd is PID 1 and runs the command as a service; see
``_systemd_boot`` for how, and docs/kernel-lab.md for why it is done that way.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from iopfd_dev.lab import kernel as lab_kernel
from iopfd_dev.lab import system
from iopfd_dev.lab.errors import LabError
from iopfd_dev.lab.guest import LINE_PREFIX

QEMU_PACKAGES = ("qemu-system-x86",)
# virtme-ng's own rootflags for the 9p root (the kernel takes the last rootflags= given), plus the cache:
# the host's root is read-only to the guest and unchanged while it runs, so the guest may cache it
# (cache=loose; virtme-ng mounts it uncached). Python's imports then cost a few 9p round trips instead
# of one per stat and read, which halved a daemon's start-up.
ROOT_FLAGS = "rootflags=version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose"


def _emit(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def run(argv: Sequence[str], *, kernel: str = lab_kernel.DEFAULT_KERNEL, timeout: float = 1800,
        shared_dir: Path | None = None, on_line: Callable[[str], None] = _emit,
        memory: str = "2G", cpus: int = 2, systemd: bool = False) -> int:
    """Boot lab kernel ``kernel``, run ``argv`` in it (in the current directory, which the guest sees
    too) and return its exit status.

    The command's output goes to ``on_line`` as it comes. ``shared_dir`` (default: a fresh temporary
    directory) is writable in the guest at the same path. ``systemd``: systemd is PID 1 (the host's
    /sbin/init) and the command runs as a service of it (see ``_systemd_boot``). Raises LabError if the
    guest never reports a status (boot failure, crash, timeout); the console log is kept and named in
    the error.
    """
    built = lab_kernel.ensure_built(kernel)
    system.ensure_packages(list(QEMU_PACKAGES))
    vng = Path(sys.executable).with_name("vng")
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="iopfd-lab-") as scratch:
        shared = Path(shared_dir or scratch)
        shared.mkdir(parents=True, exist_ok=True)
        status_file = shared / "guest-status"
        status_file.unlink(missing_ok=True)
        console_log = lab_kernel.cache_root() / ("last-console-systemd.log" if systemd else "last-console.log")
        # The command travels in a file: virtme-ng passes --exec on the kernel command line,
        # which is limited to 2048 bytes (a long command silently loses root= and the boot panics).
        script = shared / "guest-command.sh"
        guest_command = shlex.join([sys.executable, "-m", "iopfd_dev.lab.guest", str(status_file), "--", *argv])
        if systemd:
            boot = _systemd_boot(script, shared, cwd, guest_command)
        else:
            script.write_text(guest_command + "\n")
            boot = ["--append", f"loglevel=4 {ROOT_FLAGS}", "--exec", f"sh {shlex.quote(str(script))}"]
        command = [
            str(vng), "--run", str(built.bzimage), "--disable-kvm", "--force-9p", "--verbose",
            "--cpus", str(cpus), "--memory", memory, "--cwd", str(cwd), "--rwdir", str(shared), *boot,
        ]
        started = time.monotonic()
        shown = shlex.join(argv)
        shown = shown if len(shown) <= 160 else shown[:157] + "..."
        print(f"[lab] booting lab kernel {kernel} under QEMU (TCG): {shown}", file=sys.stderr, flush=True)
        with open(console_log, "w", buffering=1) as log:  # line by line: a hung boot shows how far it got
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
            assert proc.stdout is not None
            # A hung guest prints nothing, so the time limit cannot be checked between lines.
            watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
            watchdog.start()
            try:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").replace("\r", "")
                    log.write(line)
                    at = line.find(LINE_PREFIX)
                    if at >= 0:
                        on_line(line[at + len(LINE_PREFIX):])
                proc.wait()
            finally:
                watchdog.cancel()
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if time.monotonic() - started >= timeout:
            raise LabError(f"lab guest did not finish within {timeout:.0f} s and was killed; console log: "
                           f"{console_log}")
        if not status_file.exists():
            what = ("the kernel did not boot, systemd did not start kernel-command-line.service, or the guest "
                    "crashed" if systemd else "the kernel did not boot or the guest crashed")
            raise LabError(f"lab guest exited (vng status {proc.returncode}) without reporting the command's "
                           f"status: {what}; console log: {console_log}")
        status = int(status_file.read_text())
        print(f"[lab] guest finished with status {status} in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
        return status


def _systemd_boot(script: Path, shared: Path, cwd: Path, guest_command: str) -> list[str]:
    """virtme-ng arguments for the systemd boot, with ``script`` written: what systemd runs.

    ``vng --systemd`` makes the host's /sbin/init PID 1, and would run the command from a drop-in of
    serial-getty@ttyS0. On these hosts that cannot work, and two kernel arguments work around why:

    - The shared root carries /.dockerenv (the machines are built from a Docker image), so systemd
      takes the VM for a Docker container: PID 1 then mounts neither /proc nor /sys and reads the
      host's through 9p (it hangs there). ``container=`` (empty) in PID 1's environment tells it
      authoritatively that it is not in a container.
    - systemd's other programs still find /.dockerenv and take themselves for containers: generators
      then read their kernel command line from PID 1's arguments (none), and device units never
      appear (no udev on these hosts), so serial-getty@ttyS0 would wait for dev-ttyS0.device.
      ``systemd.setenv=SYSTEMD_PROC_CMDLINE=systemd.run=SCRIPT`` gives the generators the command
      line they should read, and systemd-run-generator turns it into kernel-command-line.service:
      the boot's goal is that service (sysinit.target and the command, none of the host's other
      units), and its end powers the guest off. Its output goes to the journal and the console,
      where ``run`` picks the command's lines out as in the normal boot.

    ``--exec true`` keeps virtme-ng's script mode (a panic ends QEMU; no reboot); nothing starts the
    getty it would run from.
    """
    if any(c.isspace() or c in "\"'\\" for c in str(script)):
        raise LabError(f"{script}: the systemd boot passes this path on the kernel command line, which cannot "
                       "carry spaces or quotes; set XDG_CACHE_HOME to a path without them")
    # vng --rwdir's own mount options for the shared directory (uncached: both sides write it)
    shared_flags = "trans=virtio,version=9p2000.L,access=any,msize=512000"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # The lab's systemd boot: kernel-command-line.service runs this (iopfd_dev.lab.vm._systemd_boot).
        set -e
        # What virtme-ng's init does in the normal boot: /tmp and /var/tmp writable in the guest (PrivateTmp=
        # needs them), and the shared directory, exported by vng --rwdir as virtme.initmount0, read-write.
        mount -t tmpfs -o mode=1777 tmpfs /tmp
        mount -t tmpfs -o mode=1777 tmpfs /var/tmp
        mkdir -p {shlex.quote(str(shared))}
        mount -t 9p -o {shared_flags} virtme.initmount0 {shlex.quote(str(shared))}
        cd {shlex.quote(str(cwd))}
        exec {guest_command}
        """))
    script.chmod(0o755)
    # What the generators read as the kernel command line (one argument: virtme-ng puts it in double
    # quotes, which PID 1 takes off): the command, and two units of sysinit.target masked that cost
    # every boot tens of seconds for nothing here: timesyncd fails (no network) and is restarted five
    # times; tmpfiles-setup works through the host's read-only /var over 9p (SCRIPT makes /tmp and
    # /var/tmp).
    generators = (f"systemd.run={script} systemd.mask=systemd-timesyncd.service "
                  "systemd.mask=systemd-tmpfiles-setup.service")
    kernel_args = ["loglevel=4", ROOT_FLAGS, "container=", f"systemd.setenv=SYSTEMD_PROC_CMDLINE={generators}"]
    return ["--systemd", "--append", shlex.join(kernel_args), "--exec", "true"]
