"""The daemon's configuration: sources and their priority, defaults, and the exact error lines."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from iopfd.iommufd.fault import INVALID, SUCCESS
from iopfd.service.config import EX_CONFIG, ConfigError, ResolvedQueue, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "iopfd.toml"
UNKNOWN = "unknown key; remove it or fix its spelling (config/iopfd.toml lists every key)"
BAD_NAME = "use 1 to 64 of A-Z a-z 0-9 _ . - (names appear in metric labels and logs)"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("IOPFD_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "iopfd.toml"
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **overrides)
    return str(info.value)


def test_defaults_without_a_file():
    settings = load_settings(None)
    assert (settings.log_level, settings.log_format, settings.metrics_address) == ("info", "auto", "127.0.0.1:9769")
    assert settings.metrics_endpoint == ("127.0.0.1", 9769)
    assert settings.shutdown_grace == 2.0
    assert settings.policy == "accept"
    assert (settings.defaults.response_deadline, settings.defaults.deadline_code, settings.defaults.max_pending) == \
        (1.0, "invalid", None)  # None: the engine's default for the queue's policy
    assert settings.queues == [] and settings.policies == {}
    assert EX_CONFIG == 78


def test_full_file(tmp_path):
    path = write(tmp_path, """
        log_level = "debug"
        log_format = "json"
        metrics_address = "[::1]:9100"
        shutdown_grace = 0.5
        policy = "strict"

        [defaults]
        response_deadline = 0.25
        deadline_code = "success"
        max_pending = 16

        [[queues]]
        name = "vm-1.q0"
        fd = 4
        policy = "reject"
        response_deadline = 3
        deadline_code = "invalid"
        max_pending = 2

        [[queues]]
        name = "vm_2"

        [policies.strict]
        type = "rules"
        default = "reject"
        rules = [{ dev_id = [7], policy = "accept" }]
    """)
    settings = load_settings(path)
    assert (settings.log_level, settings.log_format, settings.shutdown_grace, settings.policy) == \
        ("debug", "json", 0.5, "strict")
    assert settings.metrics_endpoint == ("::1", 9100)
    assert (settings.defaults.response_deadline, settings.defaults.deadline_code, settings.defaults.max_pending) == \
        (0.25, "success", 16)
    assert [(q.name, q.fd, q.policy) for q in settings.queues] == [("vm-1.q0", 4, "reject"), ("vm_2", None, None)]
    strict = settings.policies["strict"]
    assert strict.type == "rules"
    assert strict.options == {"default": "reject", "rules": [{"dev_id": [7], "policy": "accept"}]}


def test_example_file_loads_and_shows_the_defaults():
    settings = load_settings(EXAMPLE)
    defaults = load_settings(None)
    for key in ("log_level", "log_format", "metrics_address", "shutdown_grace", "policy", "defaults"):
        assert getattr(settings, key) == getattr(defaults, key), key
    assert settings.queues[0].resolved(settings) == ResolvedQueue(
        name="guest0", fd=3, policy="guest-rules", response_deadline=1.0, deadline_code=INVALID, max_pending=None)
    rules = settings.policies["guest-rules"]
    assert rules.type == "rules"
    assert rules.options == {"default": "reject", "rules": [
        {"dev_id": [1, 2], "address": [0, 0x8000_0000], "perm": ["read", "write"], "policy": "accept"}]}


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, """
        policy = "accept"
        metrics_address = "0.0.0.0:9769"
        [defaults]
        max_pending = 8
        deadline_code = "success"
    """)
    monkeypatch.setenv("IOPFD_POLICY", "reject")
    monkeypatch.setenv("iopfd_metrics_address", "off")  # names are case-insensitive
    monkeypatch.setenv("IOPFD_DEFAULTS__MAX_PENDING", "10")
    settings = load_settings(path)
    assert settings.policy == "reject"
    assert settings.metrics_address == "off" and settings.metrics_endpoint is None
    # A nested variable replaces one key; the file's other [defaults] keys stay.
    assert (settings.defaults.max_pending, settings.defaults.deadline_code) == (10, "success")


def test_environment_takes_lists_as_json(monkeypatch):
    monkeypatch.setenv("IOPFD_QUEUES", '[{"name": "q", "fd": 5}]')
    assert [(q.name, q.fd) for q in load_settings(None).queues] == [("q", 5)]


def test_overrides_beat_the_environment_and_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, """
        log_level = "warning"
        [defaults]
        max_pending = 8
        deadline_code = "success"
    """)
    monkeypatch.setenv("IOPFD_LOG_LEVEL", "error")
    monkeypatch.setenv("IOPFD_DEFAULTS__MAX_PENDING", "10")
    settings = load_settings(path, log_level="debug", defaults={"max_pending": 3}, policy=None)
    assert settings.log_level == "debug"
    assert (settings.defaults.max_pending, settings.defaults.deadline_code) == (3, "success")
    assert settings.policy == "accept"  # None means "flag not given"


def test_resolved_queue_applies_defaults_and_its_own_keys(tmp_path):
    path = write(tmp_path, """
        policy = "reject"
        [defaults]
        response_deadline = 0.5
        deadline_code = "success"
        max_pending = 100
        [[queues]]
        name = "plain"
        [[queues]]
        name = "own"
        fd = 9
        policy = "accept"
        response_deadline = 2
        deadline_code = "invalid"
        max_pending = 1
    """)
    settings = load_settings(path)
    plain, own = (queue.resolved(settings) for queue in settings.queues)
    assert plain == ResolvedQueue(name="plain", fd=None, policy="reject", response_deadline=0.5,
                                  deadline_code=SUCCESS, max_pending=100)
    assert own == ResolvedQueue(name="own", fd=9, policy="accept", response_deadline=2.0,
                                deadline_code=INVALID, max_pending=1)


@pytest.mark.parametrize("text, lines", [
    pytest.param('log_levle = "debug"\n[defaults]\nmax_pendng = 1\n[[queues]]\nname = "q"\nfdd = 3\n',
                 [f"defaults.max_pendng: {UNKNOWN}", f"queues.0.fdd: {UNKNOWN}", f"log_levle: {UNKNOWN}"],
                 id="unknown keys"),
    pytest.param('log_level = "verbose"\nshutdown_grace = 61\n[defaults]\nmax_pending = "many"\n'
                 'response_deadline = 0\n',
                 ["log_level: Input should be 'debug', 'info', 'warning' or 'error' (got 'verbose')",
                  "shutdown_grace: Input should be less than or equal to 60 (got 61)",
                  "defaults.response_deadline: Input should be greater than 0 (got 0)",
                  "defaults.max_pending: Input should be a valid integer, unable to parse string as an integer "
                  "(got 'many')"],
                 id="bad types and ranges"),
    pytest.param('defaults = 5\n[[queues]]\nfd = -1\n',
                 ["defaults: Input should be a table (got 5)",
                  "queues.0.name: required key is missing; add it",
                  "queues.0.fd: Input should be greater than or equal to 0 (got -1)"],
                 id="not a table, missing, negative fd"),
    pytest.param('[[queues]]\nname = "vm 1"\n[[queues]]\nname = ""\n',
                 [f"queues.0.name: invalid name 'vm 1': {BAD_NAME}", f"queues.1.name: invalid name '': {BAD_NAME}"],
                 id="bad queue names"),
    pytest.param('[[queues]]\nname = "a"\nfd = 3\n[[queues]]\nname = "b"\nfd = 3\n[[queues]]\nname = "a"\n',
                 ["queues.1.fd: fd 3 is also used by queues.0; each fault fd belongs to one queue",
                  "queues.2.name: duplicate queue name 'a', also used by queues.0; names must be unique"],
                 id="duplicate names and fds"),
    pytest.param('policy = "strict"\n[[queues]]\nname = "a"\npolicy = "foo"\n'
                 '[policies.mine]\ntype = "rules"\n',
                 ["policy: unknown policy 'strict'; define [policies.strict] or use accept, mine, reject",
                  "queues.0.policy: unknown policy 'foo'; define [policies.foo] or use accept, mine, reject"],
                 id="unknown policy references"),
    pytest.param('[policies."bad name"]\ntype = "accept"\n[policies.untyped]\nlimit = 3\n',
                 [f"policies.bad name: invalid name 'bad name': {BAD_NAME}",
                  "policies.untyped.type: required key is missing; add it"],
                 id="bad policy tables"),
])
def test_file_errors_name_every_problem(tmp_path, text, lines):
    assert config_error(write(tmp_path, text)).splitlines() == lines


@pytest.mark.parametrize("address, message", [
    ("localhost", "'localhost' is not HOST:PORT or off; e.g. 127.0.0.1:9769, [::1]:9769, off"),
    (":9769", "':9769' is not HOST:PORT or off; e.g. 127.0.0.1:9769, [::1]:9769, off"),
    ("::1:9769", "'::1:9769': write an IPv6 host in brackets, e.g. [::1]:9769"),
    ("[nope]:9769", "'nope' in '[nope]:9769' is not an IPv6 address"),
    ("host:65536", "'host:65536': the port must be a number from 0 to 65535"),
    ("host:http", "'host:http': the port must be a number from 0 to 65535"),
])
def test_bad_metrics_addresses(address, message):
    assert config_error(None, metrics_address=address) == f"metrics_address: {message} (from --metrics-address)"


def test_metrics_endpoints():
    assert load_settings(None, metrics_address="localhost:0").metrics_endpoint == ("localhost", 0)
    assert load_settings(None, metrics_address="[fe80::1%eth0]:65535").metrics_endpoint == ("fe80::1%eth0", 65535)


def test_bad_toml_syntax_names_line_and_column(tmp_path):
    path = write(tmp_path, 'log_level = "info"\n\npolicy = \n')
    assert config_error(path) == f"{path}: invalid TOML: Invalid value (at line 3, column 10)"


def test_not_utf8(tmp_path):
    path = tmp_path / "iopfd.toml"
    path.write_bytes(b'policy = "\xff"\n')
    assert config_error(path) == f"{path}: invalid TOML: not UTF-8 text (byte 10)"


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.toml"
    assert config_error(missing) == \
        f"{missing}: no such file; check the path (a documented example is config/iopfd.toml)"
    assert config_error(tmp_path) == f"{tmp_path}: not a regular file; pass the config file itself"


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, 'policy = "reject"\n')
    real_open = open

    def refusing_open(file, *args, **kwargs):  # chmod 0 means nothing to root, who runs CI
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    assert config_error(path) == f"{path}: permission denied; make the file readable by the user iopfd runs as"


def test_environment_errors_are_reported_like_file_errors(monkeypatch):
    monkeypatch.setenv("IOPFD_DEFAULTS__MAX_PENDING", "lots")
    monkeypatch.setenv("IOPFD_POLICY", "foo")  # cross-field checks run only once every field is valid
    assert config_error(None) == ("defaults.max_pending: Input should be a valid integer, unable to parse string as "
                                  "an integer (got 'lots') (from IOPFD_DEFAULTS__MAX_PENDING)")
    monkeypatch.delenv("IOPFD_DEFAULTS__MAX_PENDING")
    assert config_error(None) == ("policy: unknown policy 'foo'; define [policies.foo] or use accept, reject "
                                  "(from IOPFD_POLICY)")
    monkeypatch.setenv("IOPFD_QUEUES", "[{name: q}]")
    assert config_error(None) == (
        '(environment): error parsing value for field "queues" from source "EnvSettingsSource": Expecting property '
        "name enclosed in double quotes: line 1 column 3 (char 2); give lists and tables as JSON")
