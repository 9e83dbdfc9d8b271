"""Surviving restarts: fault fds kept in systemd's fd store, and a state file saying how far the
previous life's cookies went, so the groups it read and never answered can be swept with INVALID.

The sweep is safe because cookies are only issued at read() and the kernel refuses a response to a
cookie that is not open; iopfd must be the queue's only reader. Cookies are lowest-free, so every
open one lies at or below the highest ever seen; the mark is recorded rounded up to a power of two,
so the file is rewritten only a handful of times in a queue's life.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from iopfd.iommufd.fault import INVALID, FaultQueue, respond_all

log = structlog.get_logger("iopfd.recovery")
FD_PREFIX = "queue-"  # FDNAME of a stored fault fd: queue-<queue name>
STATE_FILE = "state.json"
SWEEP_CHUNK = 4096


class StateFile:
    """``{queue: {"cookie_mark": N, "policy": ..., "labels": {...}, "devices": {...}}}``, written atomically."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / STATE_FILE
        self._failing = False
        try:
            self.queues: dict[str, dict] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.queues = {}
        except (OSError, ValueError) as exc:
            log.warning("state file unreadable; starting without it", path=str(self.path), error=str(exc))
            self.queues = {}

    def remember(self, queue: str, **fields) -> None:
        self.queues.setdefault(queue, {"cookie_mark": 0}).update(fields)
        self._write()

    def mark(self, queue: str, cookie: int) -> int:
        """Record that ``cookie`` was read; returns the mark now on disk (>= cookie)."""
        mark = 1 << max(cookie - 1, 0).bit_length()
        self.remember(queue, cookie_mark=mark)
        return mark

    @staticmethod
    def sweep_limit(mark: int, read_records: int) -> int:
        """The cookies a restart sweeps for a queue whose recorded mark is ``mark``. The mark is
        written after the read() that raised it: a life killed in between left one read of up to
        ``read_records`` groups beyond it, and since cookies are lowest-free those lie at most that
        far above the mark (the lab's kill -9 once landed there: cookies 513-1024 left open)."""
        return mark + read_records

    def forget(self, queue: str) -> None:
        if self.queues.pop(queue, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.queues))
            os.replace(temporary, self.path)
        except OSError as exc:  # never stop serving for it; a restart then sweeps the fallback range
            if not self._failing:
                log.warning("cannot write the state file; after a crash the whole fallback range is swept",
                            path=str(self.path), error=str(exc))
            self._failing = True
        else:
            self._failing = False


def sweep(queue: FaultQueue, upto: int) -> list[int]:
    """Answer INVALID every open cookie in 1..upto; returns them (groups a previous life read and
    never answered)."""
    answered: list[int] = []
    for start in range(1, upto + 1, SWEEP_CHUNK):
        cookies = range(start, min(start + SWEEP_CHUNK, upto + 1))
        refused = set(respond_all(queue, [(cookie, INVALID) for cookie in cookies]))
        answered += [cookie for index, cookie in enumerate(cookies) if index not in refused]
    return answered
