"""configure_logging: JSON lines for non-terminals, human text for terminals, level filtering."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from iopfd.service.logging import configure_logging


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("iopfd.engine")
    log.info("queue_started", queue=3)
    log.warning("slow", ms=12.5)
    first, second = json_lines(out)
    assert first["event"] == "queue_started" and first["level"] == "info" and first["queue"] == 3
    assert first["logger"] == "iopfd.engine"
    assert first["timestamp"].endswith("Z")
    assert second["level"] == "warning" and second["ms"] == 12.5


def test_json_exception_is_structured():
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    try:
        raise ValueError("bad cookie")
    except ValueError:
        structlog.get_logger().exception("response_failed")
    (entry,) = json_lines(out)
    assert entry["level"] == "error"
    assert entry["exception"][0]["exc_type"] == "ValueError"
    assert "logger" not in entry  # get_logger() without a name


def test_level_filters_lower_levels():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("iopfd.engine")
    log.debug("noise")
    log.info("kept")
    assert [e["event"] for e in json_lines(out)] == ["kept"]

    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    structlog.get_logger().debug("noise")
    assert [e["event"] for e in json_lines(out)] == ["noise"]


def test_console_is_human_text():
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    structlog.get_logger("iopfd.engine").info("queue_started", queue=3)
    text = out.getvalue()
    assert "queue_started" in text and "queue=3" in text and "iopfd.engine" in text
    assert "\x1b[" not in text  # no colours: not a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_picks_json_for_non_tty():
    out = io.StringIO()
    configure_logging(stream=out)
    structlog.get_logger().info("hello")
    assert json_lines(out)[0]["event"] == "hello"


def test_auto_picks_coloured_console_for_tty():
    out = FakeTTY()
    configure_logging(stream=out)
    structlog.get_logger().info("hello")
    text = out.getvalue()
    assert "hello" in text and "\x1b[" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "auto"), ("info", "xml")])
def test_rejects_unknown_level_or_format(level, fmt):
    with pytest.raises(ValueError):
        configure_logging(level, fmt, stream=io.StringIO())
