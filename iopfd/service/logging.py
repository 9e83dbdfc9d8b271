"""structlog configuration for the daemon.

Output is JSON lines when stderr is not a terminal (journald, files, pipes: one parseable object
per line) and coloured human text when it is. Loggers come from ``structlog.get_logger("iopfd.x")``;
that name is added to every event as ``logger``.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")


class _NamedPrintLoggerFactory(structlog.PrintLoggerFactory):
    """Like PrintLoggerFactory, but keeps the name given to get_logger(), which the stock one drops."""

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        logger = super().__call__()
        logger.name = args[0] if args else None
        return logger


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
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
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=tty))  # it renders exc_info itself
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_NamedPrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,  # allows reconfiguring (tests, config reload)
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty(), or a closed stream
        return False
