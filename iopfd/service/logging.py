"""structlog configuration for the daemon.

Output is JSON lines when stderr is not a terminal (journald, files, pipes: one parseable object
per line) and coloured human text when it is. Loggers come from ``structlog.get_logger("iopfd.x")``;
that name is added to every event as ``logger``.

When stderr is journald's stream (JOURNAL_STREAM names its device and inode), every line starts with
an sd-daemon(3) ``<N>`` priority, so ``journalctl -p warning`` shows warnings and errors only.
Writing a line never raises: a reader of stderr that went away (a closed pipe) must not turn a log
call, e.g. inside a signal handler, into the daemon's end.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}  # syslog(3) levels


class _SafePrintLogger(structlog.PrintLogger):
    """A PrintLogger whose lines are dropped, not raised, when the stream cannot take them."""

    name: str | None = None  # what get_logger() was given, for the "logger" key

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # EPIPE, EIO, ENOSPC; ValueError: the stream was closed
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _NamedPrintLoggerFactory:
    """Makes _SafePrintLogger with the name given to get_logger() (the stock factory drops it)."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _SafePrintLogger:
        logger = _SafePrintLogger(self._file)
        logger.name = args[0] if args else None
        return logger


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      environ: Mapping[str, str] = os.environ) -> None:
    """Configure structlog globally: minimum ``level``, ``fmt`` auto/json/console, output ``stream`` (stderr)."""
    level, fmt = level.lower(), fmt.lower()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(LEVELS)})")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")
    stream = stream or sys.stderr
    tty = _isatty(stream)
    if fmt == "auto":
        fmt = "console" if tty else "json"
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    if fmt == "json":
        # Tracebacks as structured data rather than one multi-line string inside the JSON object.
        processors.append(structlog.processors.dict_tracebacks)
        renderer: Processor = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)  # it renders exc_info itself
    processors.append(_with_priority(renderer) if is_journal_stream(stream, environ) else renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_NamedPrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,  # allows reconfiguring (tests, config reload)
    )


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is the journald stream systemd connected (JOURNAL_STREAM=DEVICE:INODE)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):  # no fd (a StringIO), closed, or no JOURNAL_STREAM
        return False


def _with_priority(renderer: Processor) -> Processor:
    """``renderer`` with each line of its output prefixed by ``<N>``, the event's syslog priority
    (journald reads the prefix on every line, so a console traceback keeps its event's priority)."""

    def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        prefix = f"<{PRIORITIES.get(event_dict.get('level', ''), PRIORITIES['info'])}>"
        text = renderer(logger, method_name, event_dict)
        return "\n".join(prefix + line for line in str(text).split("\n"))

    return render


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty(), or a closed stream
        return False
