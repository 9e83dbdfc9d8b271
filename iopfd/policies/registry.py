"""Policy types (built-in or from the ``iopfd.policies`` entry-point group) and named instances.

A policy type is a class. If it has an ``Options`` pydantic model, the options of its config table
are validated with it; it is then built by ``cls.from_config(name, options, lookup)`` when it has
that classmethod (policies made of other policies, like ``rules``), else ``cls(name, options)``, or
``cls(name)`` when it takes no options.
"""

from __future__ import annotations

from collections.abc import Mapping
import importlib
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from iopfd.engine.policy import Policy
from iopfd.policies.builtin import AcceptPolicy, RejectPolicy
from iopfd.policies.forward import ForwardPolicy
from iopfd.policies.ioas_map import IoasMapPolicy
from iopfd.policies.rules import RulesPolicy

ENTRY_POINT_GROUP = "iopfd.policies"
BUILTIN_TYPES: dict[str, type] = {"accept": AcceptPolicy, "reject": RejectPolicy, "rules": RulesPolicy,
                                  "forward": ForwardPolicy, "ioas-map": IoasMapPolicy}
IMPLICIT = ("accept", "reject")  # names usable without a [policies.NAME] table


class PolicyError(Exception):
    """Policies that cannot be built; ``lines`` are ``(path.to.field, message)`` pairs."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(f"{path}: {message}" for path, message in lines))
        self.lines = lines


def policy_type(type_name: str) -> type:
    """A built-in, ``package.module:Class``, or the name of an entry point of ENTRY_POINT_GROUP."""
    if type_name in BUILTIN_TYPES:
        return BUILTIN_TYPES[type_name]
    if ":" in type_name:
        return _class_at(type_name)
    found = entry_points(group=ENTRY_POINT_GROUP, name=type_name)
    if not found:
        raise LookupError(f"unknown policy type {type_name!r}: not built in ({', '.join(BUILTIN_TYPES)}), not "
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


class Policies:
    """Named policy instances, built from their config tables on first use and then shared."""

    def __init__(self, tables: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
        self._tables = dict(tables)  # name -> (type, options)
        self._built: dict[str, Policy] = {}
        self._building: list[str] = []

    def get(self, name: str, where: str = "policy") -> Policy:
        """The policy called ``name``; ``where`` is the config path that names it, for errors."""
        if name in self._built:
            return self._built[name]
        if name in self._building:
            cycle = " -> ".join([*self._building[self._building.index(name):], name])
            raise PolicyError([(where, f"policies refer to each other in a cycle: {cycle}")])
        if name not in self._tables:
            if name in IMPLICIT:
                self._built[name] = BUILTIN_TYPES[name](name)
                return self._built[name]
            known = sorted({*self._tables, *IMPLICIT})
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
