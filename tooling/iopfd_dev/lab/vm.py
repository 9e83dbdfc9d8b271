"""Boot a lab kernel under QEMU (virtme-ng, TCG: KVM hangs on these hosts) and run a command in it.

The guest sees the host's root filesystem read-only over 9p, so it runs this checkout and its
virtualenv unmodified. One directory is shared read-write for results.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from iopfd_dev.lab import kernel as lab_kernel
from iopfd_dev.lab import system
from iopfd_dev.lab.errors import LabError
from iopfd_dev.lab.guest import LINE_PREFIX

QEMU_PACKAGES = ("qemu-system-x86",)
# virtme-ng's own rootflags for the 9p root (the kernel takes the last rootflags= given), plus the cache.
ROOT_FLAGS = "rootflags=version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose"


def _emit(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def run(argv: Sequence[str], *, kernel: str = lab_kernel.DEFAULT_KERNEL, timeout: float = 1800,
        shared_dir: Path | None = None, on_line: Callable[[str], None] = _emit,
        memory: str = "2G", cpus: int = 2) -> int:
    """Boot lab kernel ``kernel``, run ``argv`` in it (in the current directory, which the guest sees
    too) and return its exit status.

    The command's output goes to ``on_line`` as it comes. ``shared_dir`` (default: a fresh temporary
    directory) is writable in the guest at the same path. Raises LabError if the guest never reports
    a status (boot failure, crash, timeout); the console log is kept and named in the error.
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
        console_log = lab_kernel.cache_root() / "last-console.log"
        # The command travels in a file: virtme-ng passes --exec on the kernel command line,
        # which is limited to 2048 bytes (a long command silently loses root= and the boot panics).
        script = shared / "guest-command.sh"
        script.write_text(shlex.join([sys.executable, "-m", "iopfd_dev.lab.guest", str(status_file), "--", *argv])
                          + "\n")
        command = [
            str(vng), "--run", str(built.bzimage), "--disable-kvm", "--force-9p", "--verbose",
            "--cpus", str(cpus), "--memory", memory, "--cwd", str(cwd), "--rwdir", str(shared),
            # The host's root is read-only to the guest and unchanged while it runs, so the guest may
            # cache it (cache=loose; virtme-ng mounts it uncached): Python's imports then cost a few
            # 9p round trips instead of one per stat and read, which halved a daemon's start-up.
            "--append", f"loglevel=4 {ROOT_FLAGS}",
            "--exec", f"sh {shlex.quote(str(script))}",
        ]
        started = time.monotonic()
        shown = shlex.join(argv)
        shown = shown if len(shown) <= 160 else shown[:157] + "..."
        print(f"[lab] booting lab kernel {kernel} under QEMU (TCG): {shown}", file=sys.stderr, flush=True)
        with open(console_log, "w") as log:
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
            raise LabError(f"lab guest exited (vng status {proc.returncode}) without reporting the command's "
                           f"status: the kernel did not boot or the guest crashed; console log: {console_log}")
        status = int(status_file.read_text())
        print(f"[lab] guest finished with status {status} in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
        return status
