"""Policy types (built-in or from the ``iopfd.policies`` entry-point group) and named instances.

A policy type is a class. If it has an ``Options`` pydantic model, the options of its config table
are validated with it; it is then built by ``cls.from_config(name, options, lookup)`` when it has
that classmethod (policies made of other policies, like ``rules``), else ``cls(name, options)``, or
``cls(name)`` when it takes no options.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from iopfd.engine.batch import np
from iopfd.engine.policy import FixedPolicy, Policy
from iopfd.iommufd.fault import INVALID, SUCCESS
from iopfd.policies.forward import ForwardPolicy
from iopfd.policies.ioas_map import IoasMapPolicy
from iopfd.policies.rules import RulesPolicy

ENTRY_POINT_GROUP = "iopfd.policies"
# The fixed answers: built-in types, and policies usable by name without a [policies.NAME] table.
FIXED = {"accept": SUCCESS, "reject": INVALID}
BUILTIN_TYPES: dict[str, type[Policy]] = {"rules": RulesPolicy, "forward": ForwardPolicy, "ioas-map": IoasMapPolicy}


class PolicyError(Exception):
    """Policies that cannot be built; ``lines`` are ``(path.to.field, message)`` pairs."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(f"{path}: {message}" for path, message in lines))
        self.lines = lines


def policy_type(type_name: str) -> Callable[..., Policy]:
    """A built-in, ``package.module:Class``, or the name of an entry point of ENTRY_POINT_GROUP: what
    builds the policy, ``f(name)`` or ``f(name, options)``."""
    if type_name in FIXED:
        return partial(FixedPolicy, code=FIXED[type_name])
    if type_name in BUILTIN_TYPES:
        return BUILTIN_TYPES[type_name]
    if ":" in type_name:
        return _class_at(type_name)
    found = entry_points(group=ENTRY_POINT_GROUP, name=type_name)
    if not found:
        built_in = ", ".join([*FIXED, *BUILTIN_TYPES])
        raise LookupError(f"unknown policy type {type_name!r}: not built in ({built_in}), not "
                          "package.module:Class, and no installed package provides it in the entry-point group "
                          f"{ENTRY_POINT_GROUP!r}")
    entry = next(iter(found))
    try:
        return entry.load()
    except Exception as exc:
        raise LookupError(f"policy type {type_name!r} ({entry.value}) failed to load: {exc}") from exc


def _class_at(path: str) -> type:
    module_name, _, attribute = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # ImportError, AttributeError, or the module's own failure
        raise LookupError(f"policy type {path!r} cannot be loaded: {type(exc).__name__}: {exc}; give "
                          "package.module:Class of an importable module") from None
    if not (isinstance(found, type) and issubclass(found, Policy)):
        raise LookupError(f"policy type {path!r} is {found!r}, not a subclass of iopfd.policies.Policy")
    return found


Tables = Mapping[str, tuple[str, Mapping[str, Any]]]  # policy name -> (type, options), as the config has them


class Policies:
    """Named policy instances, built from their config tables on first use and then shared.
    ``kept``: instances to use as they are rather than build again (a reload keeps those whose tables
    did not change: a forward policy keeps its peer, ioas-map its bound queues)."""

    def __init__(self, tables: Tables, kept: Mapping[str, Policy] | None = None) -> None:
        self._tables = dict(tables)
        self._built: dict[str, Policy] = dict(kept or {})
        self._building: list[str] = []

    @classmethod
    def build_all(cls, tables: Tables, default: str, kept: Mapping[str, Policy] | None = None) -> Policies:
        """Every table and the default policy built now, so that a bad table fails at start-up even
        when no queue uses it yet; raises PolicyError naming every broken table."""
        policies = cls(tables, kept)
        problems: list[tuple[str, str]] = []
        for name, where in [*((name, f"policies.{name}") for name in sorted(tables)), (default, "policy")]:
            try:
                policies.get(name, where)
            except PolicyError as exc:
                problems += exc.lines
        if problems:
            # A table that refers to a broken one fails with the same lines: each is reported once.
            raise PolicyError(list(dict.fromkeys(problems)))
        if any(not isinstance(policy, FixedPolicy) for policy in policies.built()):
            np()  # the batch path's numpy, imported before READY=1 rather than on the first attach
        return policies

    def get(self, name: str, where: str = "policy") -> Policy:
        """The policy called ``name``; ``where`` is the config path that names it, for errors."""
        if name in self._built:
            return self._built[name]
        if name in self._building:
            cycle = " -> ".join([*self._building[self._building.index(name):], name])
            raise PolicyError([(where, f"policies refer to each other in a cycle: {cycle}")])
        if name not in self._tables:
            if name in FIXED:
                self._built[name] = FixedPolicy(name, FIXED[name])
                return self._built[name]
            known = sorted({*self._tables, *FIXED})
            raise PolicyError([(where, f"unknown policy {name!r}; define [policies.{name}] or use one of "
                                       f"{', '.join(known)}")])
        self._building.append(name)
        try:
            self._built[name] = self._build(name, *self._tables[name])
        finally:
            self._building.pop()
        return self._built[name]

    def built(self) -> list[Policy]:
        """Every policy built so far."""
        return list(self._built.values())

    def _build(self, name: str, type_name: str, options: Mapping[str, Any]) -> Policy:
        path = f"policies.{name}"
        try:
            cls = policy_type(type_name)
        except LookupError as exc:
            raise PolicyError([(f"{path}.type", str(exc))]) from None
        model = getattr(cls, "Options", None)
        if model is None:
            if options:
                raise PolicyError([(f"{path}.{key}", f"policy type {type_name!r} takes no options")
                                   for key in options])
            return cls(name)
        try:
            parsed = model.model_validate(dict(options))
        except ValidationError as exc:
            raise PolicyError([(".".join([path, *map(str, error["loc"])]), error["msg"])
                               for error in exc.errors()]) from None
        from_config = getattr(cls, "from_config", None)
        try:
            if from_config is not None:
                return from_config(name, parsed, lambda other, where: self.get(other, f"{path}.{where}"))
            return cls(name, parsed)
        except ValueError as exc:  # options valid, but not usable here (a missing backing file, the kernel)
            raise PolicyError([(path, str(exc))]) from None


def unchanged(old: Tables, new: Tables) -> set[str]:
    """Names whose table is the same in ``new`` as in ``old``, and so is every table it names (any
    string in its options that is a policy's name counts, which errs towards rebuilding)."""
    same = {name for name, table in new.items() if old.get(name) == table}
    while True:
        broken = {name for name in same if any(other in new and other not in same
                                                for other in _strings(new[name][1]))}
        if not broken:
            return same
        same -= broken


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
