"""Runs inside the lab guest: executes a command, tags its output for the host, records its status.

Usage (by iopfd_dev.lab.vm, never by hand): python -m iopfd_dev.lab.guest STATUS_FILE -- ARGV...
The host separates the command's lines (prefixed ``@@|``) from kernel console messages.
"""

from __future__ import annotations

import os
import subprocess
import sys

LINE_PREFIX = "@@| "
GUEST_ENV = "IOPFD_LAB_GUEST"


def main(argv: list[str]) -> int:
    status_file, separator, *command = argv
    assert separator == "--", "usage: python -m iopfd_dev.lab.guest STATUS_FILE -- ARGV..."
    # The host's virtualenv first on PATH, so ``python`` and ``iopfd`` are this checkout's.
    path = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = {**os.environ, "PATH": path, GUEST_ENV: "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"{LINE_PREFIX}cannot run {command[0]}: {exc}", flush=True)
        status = 127
    else:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(LINE_PREFIX + line.decode(errors="replace"))
            sys.stdout.flush()
        status = proc.wait()
    with open(status_file, "w") as f:
        f.write(f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
