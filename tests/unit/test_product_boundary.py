"""The product apart from its tooling: ``iopfd run`` imports no lab, bench, demo, emulation, selftest or
VFIO module (and no numpy while it serves only fixed answers), and no product module imports the tooling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iopfd_dev.daemon import spawn_daemon

ROOT = Path(__file__).parents[2]
NEVER_IN_THE_DAEMON = ("iopfd_dev", "iopfd.iommufd.selftest", "iopfd.iommufd.vfio", "virtme", "matplotlib")


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from ``python -X importtime``'s lines: ``import time: self | cumulative | name``."""
    return {match.group(1).strip() for match in re.finditer(r"^import time:[^|]*\|[^|]*\|(.*)$", importtime_log, re.M)}


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("policy", "numpy_expected"), [("accept", False), ("rules", True)])
def test_iopfd_run_imports_none_of_the_tooling(tmp_path, policy, numpy_expected):
    config = tmp_path / "iopfd.toml"
    config.write_text(f'policy = "p"\nruntime_dir = "{tmp_path}"\nwatch_devices = false\n[control]\n'
                      f'path = "{tmp_path}/control.sock"\n[policies.p]\ntype = "{policy}"\n'
                      + ('default = "accept"\n' if policy == "rules" else ""))
    daemon = spawn_daemon(tmp_path, (), "--config", str(config), "--metrics-address", "127.0.0.1:0",
                          program=("-X", "importtime", "-m", "iopfd", "run"))
    try:
        assert daemon.terminate() == 0
        modules = imported_modules(daemon.output())
    finally:
        daemon.close()
    assert "iopfd.service.server" in modules  # the log is what we think it is
    assert not [m for m in modules if m.startswith(NEVER_IN_THE_DAEMON)]
    assert ("numpy" in modules) == numpy_expected


def test_no_product_module_imports_the_tooling():
    importers = [str(path.relative_to(ROOT)) for path in (ROOT / "iopfd").rglob("*.py")
                 if re.search(r"^\s*(from|import) iopfd_dev\b", path.read_text(), re.M)]
    assert importers == []


# The product's layers, lowest first (docs/architecture.md): a module may import its own layer and
# the ones below it, never one above.
LAYERS = (("iopfd.uapi_ffi",), ("iopfd.iommufd",), ("iopfd.engine",), ("iopfd.policies",),
          ("iopfd.service", "iopfd.protocol"), ("iopfd.cli", "iopfd.client", "iopfd.__main__"))


def _layer(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None  # iopfd/__init__.py: the package itself


def test_layers_import_only_downward():
    wrong = []
    for path in sorted((ROOT / "iopfd").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        own = _layer(module)
        if own is None:
            continue
        for imported in re.findall(r"^\s*(?:from|import)\s+(iopfd(?:\.\w+)*)", path.read_text(), re.M):
            level = _layer(imported)
            if level is not None and level > own:
                wrong.append(f"{module} (layer {own + 1}) imports {imported} (layer {level + 1})")
    assert not wrong, "\n".join(wrong)
