"""Bad configuration, fuzzed: whatever the file or the IOPFD_* environment holds, load_settings either
succeeds or raises ConfigError naming each bad field, and check-config exits 78 naming it."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iopfd.policies import Policies, PolicyError
from iopfd.service.config import EX_CONFIG, ConfigError, load_settings

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- TOML documents --------------------------------------------------------------------------------
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # TOML is UTF-8: no lone surrogates
scalars = (text | st.integers(-2**63, 2**63 - 1) | st.floats() | st.booleans() | st.datetimes() | st.dates()
           | st.times())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=8)


def mostly(plausible, other=values):
    """Mostly plausible values: a document has many keys, and one bad key hides no other, but policy
    tables are built only once the whole document is valid."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda pick: plausible if pick else other)


def table(fields: dict):
    """Each key present or not, plausible or any value, and at times unknown keys beside them."""
    known = st.fixed_dictionaries({}, optional={key: mostly(value) for key, value in fields.items()})
    unknown = mostly(st.just({}), st.dictionaries(text, values, min_size=1, max_size=2))
    return st.tuples(unknown, known).map(lambda pair: {**pair[0], **pair[1]})


names = mostly(st.sampled_from(["q", "vm-1.q0", "mine"]), st.sampled_from(["", "bad name", "a" * 65]) | text)
policy_names = st.sampled_from(["accept", "reject", "mine", "nope", ""])
numbers = st.integers(-5, 2_000_000) | st.floats(-1, 100) | st.sampled_from(["1", "many"])
QUEUE = {"name": names, "fd": st.integers(-1, 2**64), "policy": policy_names, "response_deadline": numbers,
         "deadline_code": st.sampled_from(["success", "invalid", "maybe"]), "max_pending": numbers}
DEFAULTS = {key: QUEUE[key] for key in ("response_deadline", "deadline_code", "max_pending")}
RULE = {"dev_id": st.lists(st.integers(-1, 2**32)), "pasid": st.lists(st.integers(-1, 3) | st.just("none")),
        "address": st.lists(st.integers(-1, 2**65), max_size=3), "perm": st.lists(st.sampled_from(["read", "fly"])),
        "queue": st.lists(names, max_size=2), "policy": policy_names}
POLICY = {"type": st.sampled_from(["accept", "reject", "rules", "forward", "iopfd_dev.policies:DelayPolicy", "nope",
                                   ""]),
          "default": policy_names, "rules": st.lists(table(RULE), max_size=2), "seconds": numbers,
          "when_disconnected": st.sampled_from(["success", "invalid", "never"])}
CONTROL = {"path": st.sampled_from(["off", "/run/x.sock"]), "mode": st.integers(-1, 0o1000),
           "allowed_uids": st.lists(st.integers(-1, 2**32), max_size=2),
           "allowed_gids": st.lists(st.integers(-1, 2**32), max_size=2)}
SETTINGS = {
    "log_level": st.sampled_from(["debug", "info", "warning", "error", "verbose"]),
    "log_format": st.sampled_from(["auto", "json", "console", "xml"]),
    "metrics_address": st.sampled_from(["127.0.0.1:9769", "off", "[::1]:0", "localhost", ":1", "h:99999", "[x]:1"]),
    "shutdown_grace": numbers, "policy": policy_names, "watch_devices": st.booleans(), "runtime_dir": text,
    "defaults": table(DEFAULTS), "queues": st.lists(table(QUEUE), max_size=3),
    "policies": st.dictionaries(names, table(POLICY), max_size=2), "control": table(CONTROL),
}
documents = table(SETTINGS)


def toml(value) -> str:
    """A TOML value: inline tables and arrays, so any document is a list of ``key = value`` lines."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # TOML spells inf, -inf and nan as Python does
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else "\\" + c if c in '"\\' else c
                             for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml(key)} = {toml(item)}" for key, item in value.items()) + "}"


def document(doc: dict) -> str:
    return "".join(f"{toml(key)} = {toml(value)}\n" for key, value in doc.items())


def key_paths(value, prefix: str = "") -> set[str]:
    """Every ``a.0.b`` path into a document, lower-cased (top-level keys match in any case); an empty
    key is written ``""``."""
    paths = set()
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{prefix}{key if key != '' else chr(34) * 2}".lower()
        paths |= {path} | key_paths(item, path + ".")
    return paths


def names_a_field(path: str, message: str, paths: set[str]) -> bool:
    """``path`` is a key of the document, or a required key missing from a table in it."""
    path = path.lower()
    return path in paths or (message.startswith("required key is missing") and path.rpartition(".")[0] in paths)


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """Exactly these IOPFD_* variables, for the block."""
    saved = {name: value for name, value in os.environ.items() if name.upper().startswith("IOPFD_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in variables:
            os.environ.pop(name, None)
        os.environ.update(saved)


@pytest.mark.parametrize("documents", [documents, st.fixed_dictionaries({"policies": SETTINGS["policies"]})],
                         ids=["any", "policy-tables"])  # the second builds policies far more often
def test_any_document_loads_or_names_each_bad_field(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("fuzz") / "iopfd.toml"

    @FUZZ
    @given(documents)
    def check(doc):
        path.write_text(document(doc), encoding="utf-8")
        with environment({}):
            try:
                loaded = load_settings(path)
            except ConfigError as exc:
                paths = key_paths(doc)
                assert exc.lines and all(names_a_field(where, message, paths) for where, message in exc.lines), \
                    (str(exc), doc)
                return
        try:  # what check-config does next
            Policies.build_all(loaded.policy_tables, loaded.policy)
        except PolicyError as exc:
            assert all(where.startswith(("policies.", "policy")) for where, _ in exc.lines), str(exc)

    check()


ENVIRONMENT = ["LOG_LEVEL", "SHUTDOWN_GRACE", "POLICY", "WATCH_DEVICES", "METRICS_ADDRESS", "RUNTIME_DIR", "DEFAULTS",
               "DEFAULTS__MAX_PENDING", "DEFAULTS__RESPONSE_DEADLINE", "DEFAULTS__DEADLINE_CODE", "DEFAULTS__NOPE",
               "QUEUES", "QUEUES__0__NAME", "POLICIES", "POLICIES__X__TYPE", "POLICIES__X", "CONTROL",
               "CONTROL__MODE", "CONTROL__ALLOWED_UIDS", "CONTROL__PATH", "DEFAULTS__MAX_PENDING__X"]
env_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
env_values = st.one_of(env_text, values.map(lambda value: json.dumps(value, default=str)),
                       st.sampled_from(["1", "0", "-1", "true", "off", "nan", "1e999", "[]", "{}", "null",
                                        '[{"name": "q"}]', '{"type": "accept"}', "[" * 2000]))


env_names = st.sampled_from(ENVIRONMENT).flatmap(  # names are case-insensitive
    lambda name: st.sampled_from(["IOPFD_" + name, "iopfd_" + name.lower()]))


@FUZZ
@given(st.dictionaries(env_names, env_values, max_size=3))
def test_any_environment_loads_or_names_each_bad_field(variables):
    with environment(variables):
        try:
            load_settings(None)
        except ConfigError as exc:
            fields = [name[len("IOPFD_"):].lower().replace("__", ".") for name in variables]
            for where, message in exc.lines:
                # the variable's field, a key inside it (JSON), or the field a nested variable cannot go into
                assert message and (where == "(environment)" or any(
                    f"{where.lower()}.".startswith(f"{field}.") or f"{field}.".startswith(f"{where.lower()}.")
                    for field in fields)), (str(exc), variables)


# -- iopfd check-config, as the operator runs it ---------------------------------------------------
@pytest.mark.parametrize(("text", "variables", "names"), [
    pytest.param('[defaults]\nmax_pending = "many"\n', {}, "defaults.max_pending: Input should be a valid integer",
                 id="wrong-type"),
    pytest.param('[[queues]]\nname = "a"\npolicy = "nope"\n', {}, "queues.0.policy: unknown policy 'nope'",
                 id="unknown-policy"),
    pytest.param('[policies.r]\ntype = "rules"\nrules = [{dev_id = ["x"], policy = "accept"}]\n', {},
                 "policies.r.rules.0.dev_id.0:", id="policy-option"),
    pytest.param("queues = " + "[" * 2000 + "]" * 2000 + "\n", {}, "iopfd.toml: invalid TOML: arrays or inline "
                 "tables nested too deeply", id="deep-file"),
    pytest.param("shutdown_grace = " + "1" * 5000 + "\n", {}, "iopfd.toml: invalid TOML: an integer of more than",
                 id="long-integer"),
    pytest.param("", {"IOPFD_DEFAULTS__MAX_PENDING": "lots"}, "defaults.max_pending: Input should be a valid integer",
                 id="environment"),
    pytest.param("", {"IOPFD_CONTROL__ALLOWED_UIDS": "[-1]"}, "control.allowed_uids.0: Input should be greater",
                 id="environment-list"),
    pytest.param("", {"IOPFD_QUEUES": "[" * 2000}, "(environment): an IOPFD_* variable nests lists or tables too "
                 "deeply", id="deep-environment"),
])
def test_check_config_exits_78_naming_the_field(tmp_path, text, variables, names):
    path = tmp_path / "iopfd.toml"
    path.write_text(text)
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("IOPFD_")}
    done = subprocess.run([sys.executable, "-m", "iopfd", "check-config", str(path)], env=env | variables,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EX_CONFIG, done.stderr
    assert names in done.stderr and "Traceback" not in done.stderr, done.stderr
