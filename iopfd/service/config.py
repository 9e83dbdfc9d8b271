"""The daemon's configuration: a TOML file, ``IOPFD_*`` environment variables and CLI overrides.

Sources, highest priority first: overrides passed to ``load_settings`` (CLI flags), environment
variables (``IOPFD_POLICY=reject``, ``IOPFD_DEFAULTS__MAX_PENDING=10``; lists and tables as JSON),
the TOML file, defaults. ``config/iopfd.toml`` documents every key. ``load_settings`` reports every
problem at once in one ``ConfigError``, one ``path.to.field: message`` line each; a value that came
from an ``IOPFD_*`` variable or a flag is blamed on that, not on the file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import reprlib
import stat
import sys
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from iopfd.iommufd.fault import CODES, CodeName
from iopfd.policies.registry import FIXED

EX_CONFIG = 78  # sysexits.h: configuration error
EXAMPLE = "config/iopfd.toml"
_ERROR_TYPE = "iopfd_config"  # our own messages already show the value and the fix
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConfigError(Exception):
    """The configuration cannot be used; ``lines`` holds every ``(path, message)`` problem found."""

    def __init__(self, lines: list[tuple[str, str]], *, in_file: bool = True) -> None:
        super().__init__(lines)
        self.lines = lines
        self.in_file = in_file  # False: every problem came from the environment or the command line

    def __str__(self) -> str:
        return "\n".join(f"{path}: {message}" for path, message in self.lines)


def _error(message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(_ERROR_TYPE, message, context)


NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . -"


def is_name(text: str) -> bool:
    """Whether ``text`` may name a queue or a policy."""
    return bool(_NAME.fullmatch(text))


def _check_name(name: str) -> str:
    if not is_name(name):
        raise _error("invalid name '{name}': use " + NAME_RULE + " (names appear in metric labels and logs)",
                     name=name)
    return name


def _parse_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` -> ``(host, port)``; ``off`` -> None."""
    if text == "off":
        return None
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise _error("'{text}' is not HOST:PORT or off; e.g. 127.0.0.1:9769, [::1]:9769, off", text=text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _error("'{host}' in '{text}' is not an IPv6 address", host=host, text=text) from None
    elif ":" in host:
        raise _error("'{text}': write an IPv6 host in brackets, e.g. [::1]:9769", text=text)
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise _error("'{text}': the port must be a number from 0 to 65535", text=text)
    return host, int(port)


Name = Annotated[str, AfterValidator(_check_name)]
Deadline = Annotated[float, Field(gt=0, le=60)]
MaxPending = Annotated[int, Field(ge=1, le=1_048_576)]


class QueueDefaults(BaseModel, extra="forbid"):
    """[defaults]: what a queue gets for each key it does not set."""

    response_deadline: Deadline = 1.0  # seconds a policy has before the group is answered with deadline_code
    deadline_code: CodeName = "invalid"
    # groups with the policy at once; a batch policy's groups read beyond it wait parked (up to 16 times
    # as many), and what exceeds that, or a per-group policy's beyond max_pending, is shed with INVALID.
    # None: the engine's default for the policy (16 384; 4 096 for a plug-in that decides group by group)
    max_pending: MaxPending | None = None


@dataclass(frozen=True)
class ResolvedQueue:
    """One queue with the defaults applied, as the engine uses it."""

    name: str
    fd: int | None
    policy: str
    response_deadline: float
    deadline_code: int  # SUCCESS or INVALID, the kernel's page response code
    max_pending: int | None  # None: the engine's default for the policy


class QueueSettings(BaseModel, extra="forbid"):
    """One [[queues]] entry: a fault fd and how its groups are answered."""

    name: Name
    fd: Annotated[int, Field(ge=0)] | None = None  # inherited fault fd; None: given later (e.g. --fault-fd)
    policy: str | None = None
    response_deadline: Deadline | None = None
    deadline_code: CodeName | None = None
    max_pending: MaxPending | None = None

    def resolved(self, settings: Settings) -> ResolvedQueue:
        defaults = settings.defaults
        return ResolvedQueue(
            name=self.name,
            fd=self.fd,
            policy=settings.policy if self.policy is None else self.policy,
            response_deadline=defaults.response_deadline if self.response_deadline is None else self.response_deadline,
            deadline_code=CODES[defaults.deadline_code if self.deadline_code is None else self.deadline_code],
            max_pending=defaults.max_pending if self.max_pending is None else self.max_pending,
        )


class PolicySettings(BaseModel, extra="allow"):
    """One [policies.NAME] table: the implementation's name and its own options."""

    # built in (accept, reject, rules, forward, ioas-map), package.module:Class, or an "iopfd.policies" entry point
    type: str = Field(min_length=1)

    @property
    def options(self) -> dict[str, Any]:
        """The other keys; the policy layer validates them, as only it knows their meaning."""
        return dict(self.model_extra or {})


class ControlSettings(BaseModel, extra="forbid"):
    """[control]: the Unix socket VMMs use to hand over fault fds (see docs/protocol.md)."""

    path: str = "/run/iopfd/control.sock"  # or "off"; systemd socket activation takes precedence
    mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660  # file mode of the socket (write it as 0o660)
    allowed_uids: list[Annotated[int, Field(ge=0)]] = [0]  # peers allowed by SO_PEERCRED, besides iopfd's own uid
    allowed_gids: list[Annotated[int, Field(ge=0)]] = []
    # Queues served at once, from the config and from peers: each holds an fd, and the service's fd
    # store (FileDescriptorStoreMax=512) must keep them all across a restart.
    max_queues: Annotated[int, Field(ge=1, le=512)] = 256

    @property
    def enabled(self) -> bool:
        return self.path != "off"

    @field_validator("mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: Any) -> Any:
        """The usual slips get a hint: "0660" (a string; a leading 0 is not octal) and 660 (decimal)."""
        if isinstance(value, str):
            if re.fullmatch(r"0o[0-7]{1,3}", value):  # IOPFD_CONTROL__MODE=0o660: the environment has only strings
                return int(value, 8)
            if re.fullmatch(r"0[0-7]{1,3}", value):
                raise _error("'{value}' is not read as octal; write 0o{octal} (a TOML number, no quotes) or "
                             "{decimal}", value=value, octal=value[1:], decimal=int(value, 8))
        if type(value) is int and value > 0o777 and re.fullmatch(r"[0-7]{3}", str(value)):
            raise _error("{value} is decimal and more than 0o777; write the mode in octal, 0o{value}, or in "
                         "decimal, {decimal}", value=value, decimal=int(str(value), 8))
        return value


def _runtime_directory(environ: Mapping[str, str]) -> str:
    """The directory systemd made for the service (RuntimeDirectory=, the first if several), else /run/iopfd."""
    return environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/run/iopfd"


# The file load_settings() is loading. A context variable rather than a class attribute, so that
# concurrent loads in other threads or tasks cannot see each other's file.
_toml_path: ContextVar[Path | None] = ContextVar("iopfd_toml_path", default=None)


class Settings(BaseSettings):
    """The whole configuration; build it with ``load_settings``."""

    model_config = SettingsConfigDict(env_prefix="IOPFD_", env_nested_delimiter="__", case_sensitive=False,
                                      extra="forbid")

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, JSON lines otherwise
    metrics_address: str = "127.0.0.1:9769"  # HOST:PORT or off
    shutdown_grace: float = Field(2.0, ge=0, le=60)  # seconds policies get on SIGTERM before deadline answers
    policy: str = "accept"  # for queues that name none
    watch_devices: bool = True  # detach a queue when the last VFIO device it serves is hot-unplugged
    # The state file (highest cookie per queue) lives here, across restarts.
    runtime_dir: str = Field(default_factory=lambda: _runtime_directory(os.environ))
    defaults: QueueDefaults = Field(default_factory=QueueDefaults)
    queues: list[QueueSettings] = []
    policies: dict[Name, PolicySettings] = {}
    control: ControlSettings = Field(default_factory=ControlSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No dotenv or secrets directory: the daemon reads its flags, its environment and one file.
        path = _toml_path.get()
        return (init_settings, env_settings) + (() if path is None else (_TomlSource(settings_cls, path),))

    @field_validator("metrics_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        _parse_address(value)
        return value

    @property
    def policy_tables(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Every [policies.NAME] table as the policy registry takes it: name -> (type, options)."""
        return {name: (table.type, table.options) for name, table in self.policies.items()}

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """``(host, port)`` to serve metrics on, or None when metrics_address is ``off``."""
        return _parse_address(self.metrics_address)

    @model_validator(mode="after")
    def _cross_check(self) -> Settings:
        problems: list[InitErrorDetails] = []

        def problem(loc: tuple[str | int, ...], value: Any, message: str, **context: Any) -> None:
            problems.append(InitErrorDetails(type=_error(message, **context), loc=loc, input=value))

        names: dict[str, int] = {}
        fds: dict[int, int] = {}
        for index, queue in enumerate(self.queues):
            first = names.setdefault(queue.name, index)
            if first != index:
                problem(("queues", index, "name"), queue.name,
                        "duplicate queue name '{name}', also used by queues.{first}; names must be unique",
                        name=queue.name, first=first)
            if queue.fd is not None and (owner := fds.setdefault(queue.fd, index)) != index:
                problem(("queues", index, "fd"), queue.fd,
                        "fd {fd} is also used by queues.{owner}; each fault fd belongs to one queue",
                        fd=queue.fd, owner=owner)
        known = {*FIXED, *self.policies}
        references: list[tuple[tuple[str | int, ...], str]] = [(("policy",), self.policy)]
        references += [(("queues", index, "policy"), q.policy) for index, q in enumerate(self.queues)
                       if q.policy is not None]
        for loc, name in references:
            if name not in known:
                problem(loc, name, "unknown policy '{name}'; define [policies.{name}] or use {known}",
                        name=name, known=", ".join(sorted(known)))
        if problems:
            # A ValidationError keeps each problem's own path, which a ValueError here could not.
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self


class _TomlSource(TomlConfigSettingsSource):
    """The config file, with read and syntax errors reported as ConfigError."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:  # the Path given to the source (a Traversable is a package's resource, never ours)
            with open(str(file_path), "rb") as file:
                return tomllib.load(file)
        except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
            raise ConfigError([(str(file_path), f"invalid TOML: {exc}")]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([(str(file_path), f"invalid TOML: not UTF-8 text (byte {exc.start})")]) from None
        except ValueError:  # tomllib's int() refuses numbers longer than Python's limit
            raise ConfigError([(str(file_path), f"invalid TOML: an integer of more than "
                                                f"{sys.get_int_max_str_digits()} digits")]) from None
        except RecursionError:
            raise ConfigError([(str(file_path), "invalid TOML: arrays or inline tables nested too deeply")]) from None
        except OSError as exc:
            raise ConfigError([(str(file_path), _os_problem(exc))]) from None


def _os_problem(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file; check the path (a documented example is {EXAMPLE})"
    if isinstance(exc, PermissionError):
        return "permission denied; make the file readable by the user iopfd runs as"
    return f"cannot read: {exc.strerror or exc}"


def _path(loc: tuple[str | int, ...]) -> str:
    # "[key]" marks a bad dict key (a policy table name); the key itself already names it. An empty
    # key (TOML allows "") shows as "".
    return ".".join(str(part) or '""' for part in loc if part != "[key]") or "(file)"


def _message(error: ErrorDetails) -> str:
    if error["type"] == _ERROR_TYPE:
        return error["msg"]
    if error["type"] == "extra_forbidden":
        return f"unknown key; remove it or fix its spelling ({EXAMPLE} lists every key)"
    if error["type"] == "missing":
        return "required key is missing; add it"
    # pydantic names the model class; a TOML user wrote (or meant) a table
    message = "Input should be a table" if error["type"] in ("model_type", "dict_type") else error["msg"]
    return f"{message} (got {reprlib.repr(error['input'])})"


_ABSENT = object()


def _blame(loc: tuple[str | int, ...], overrides: dict[str, Any], environ: Mapping[str, str]) -> str | None:
    """The flag or ``IOPFD_*`` variable the value at ``loc`` came from, or None (the file or a default)."""
    parts = [str(part) for part in loc if part != "[key]"]
    if parts and parts[0] in overrides:
        return "--" + parts[0].replace("_", "-")  # overrides are the command line's flags
    variables = {key.upper(): value for key, value in environ.items() if key.upper().startswith("IOPFD_")}
    for end in range(len(parts), 0, -1):
        name = "IOPFD_" + "__".join(part.upper() for part in parts[:end])
        if name not in variables:
            continue
        if end == len(parts):
            return name
        try:  # a table or list given whole as JSON: blamed only if it holds the bad value
            value: Any = json.loads(variables[name])
        except ValueError:
            return name
        for part in parts[end:]:
            if isinstance(value, dict):
                value = value.get(part, _ABSENT)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = _ABSENT
        if value is not _ABSENT:
            return name
    return None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from the TOML file at ``path`` (None: no file), the environment and ``overrides``.

    ``overrides`` are field values that beat every other source (CLI flags); None values are skipped,
    so unset options can be passed as they are. Raises ConfigError naming every problem.
    """
    if path is not None:
        path = Path(path).expanduser()
        # TomlConfigSettingsSource skips a missing file silently; a file that was named must exist.
        try:
            regular = stat.S_ISREG(path.stat().st_mode)
        except OSError as exc:
            raise ConfigError([(str(path), _os_problem(exc))]) from None
        if not regular:
            raise ConfigError([(str(path), "not a regular file; pass the config file itself")])
    token = _toml_path.set(path)
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines, in_file = [], False
        for error in exc.errors():
            source = _blame(error["loc"], given, os.environ)
            in_file = in_file or source is None
            blame = "" if source is None else f" (from {source})"
            lines.append((_path(error["loc"]), _message(error) + blame))
        raise ConfigError(lines, in_file=in_file) from None
    except SettingsError as exc:  # an IOPFD_* variable that is not valid JSON where JSON is needed
        raise ConfigError([("(environment)", f"{exc}: {exc.__cause__}; give lists and tables as JSON")],
                          in_file=False) from None
    except RecursionError:  # the file's source catches its own: JSON from an IOPFD_* variable
        raise ConfigError([("(environment)", "an IOPFD_* variable nests lists or tables too deeply")],
                          in_file=False) from None
    finally:
        _toml_path.reset(token)
