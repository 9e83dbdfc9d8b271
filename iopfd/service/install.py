"""``iopfd install-units``: put the systemd units, the host config and the man page this package ships
where systemd, iopfd and man(1) look for them.

The files' single source is the repository's systemd/, config/ and man/; the wheel carries them as
``iopfd/data/`` (pyproject.toml's force-include). An editable install reads the checkout's own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# The path the shipped unit names; it is where the documented install (docs/operations.md) puts it.
UNIT_BINARY = "/usr/local/bin/iopfd"
UNIT_DIR = "etc/systemd/system"
CONFIG = "etc/iopfd/iopfd.toml"
EXAMPLES_DIR = "usr/local/share/doc/iopfd/examples"
MAN_PAGE = "usr/local/share/man/man8/iopfd.8"
EXAMPLES = ("iopfd.toml", "iopfd-host.toml", "iopfd-sidecar.toml")

# What iopfd.service hides from the daemon, so its binary, venv or interpreter must not live there.
HIDDEN_FROM_SERVICE = {
    Path("/home"): "ProtectHome=yes", Path("/root"): "ProtectHome=yes", Path("/run/user"): "ProtectHome=yes",
    Path("/tmp"): "PrivateTmp=yes", Path("/var/tmp"): "PrivateTmp=yes",
}


class InstallError(Exception):
    pass


def shipped(relative: str) -> str:
    """A file of the repository's systemd/, config/ or man/, from the wheel or from the checkout."""
    package = Path(__file__).parents[1]
    data = package / "data"
    path = (data if data.is_dir() else package.parent) / relative
    try:
        return path.read_text()
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}; this iopfd package is incomplete, reinstall it") \
            from None


def running_binary() -> Path:
    """The ``iopfd`` command being run: its path as invoked, so a stable symlink stays a symlink."""
    invoked = Path(sys.argv[0])
    if invoked.name == "iopfd" and invoked.is_file():
        return invoked.absolute()
    return Path(sys.executable).parent / "iopfd"  # `python -m iopfd`: the venv's own script


def hidden_from_service(binary: Path) -> list[str]:
    """Warnings for each of the binary, its venv and its interpreter that the unit's sandbox hides."""
    warnings = []
    for what, path in (("the iopfd command", binary), ("its environment", Path(sys.prefix)),
                       ("its Python", Path(sys.executable).resolve())):
        for hidden, option in HIDDEN_FROM_SERVICE.items():
            if path.absolute().is_relative_to(hidden):
                warnings.append(f"iopfd.service cannot reach {what} at {path}: {option} hides {hidden} from it; "
                                f"install iopfd as docs/operations.md says (UV_TOOL_DIR=/opt/uv-tools "
                                f"UV_TOOL_BIN_DIR=/usr/local/bin uv tool install --python /usr/bin/python3 ...)")
    return warnings


@dataclass(frozen=True)
class Installed:
    path: Path
    kept: bool = False  # an operator's file that was left as it was


def install(root: Path, binary: Path) -> list[Installed]:
    """Write the units (ExecStart naming ``binary``), the man page and the examples under ``root``.

    An existing /etc/iopfd/iopfd.toml is the operator's and is kept; everything else is the package's
    and is replaced.
    """
    service = shipped("systemd/iopfd.service")
    if f"ExecStart={UNIT_BINARY} " not in service:
        raise InstallError(f"the shipped iopfd.service has no ExecStart={UNIT_BINARY}: the package is broken")
    files = {
        f"{UNIT_DIR}/iopfd.service": service.replace(f"ExecStart={UNIT_BINARY} ", f"ExecStart={binary} "),
        f"{UNIT_DIR}/iopfd.socket": shipped("systemd/iopfd.socket"),
        MAN_PAGE: shipped("man/iopfd.8"),
        **{f"{EXAMPLES_DIR}/{name}": shipped(f"config/{name}") for name in EXAMPLES},
    }
    done = []
    for relative, text in files.items():
        done.append(Installed(_write(root / relative, text)))
    config = root / CONFIG
    if config.exists():
        done.append(Installed(config, kept=True))
    else:
        done.append(Installed(_write(config, shipped("config/iopfd-host.toml"))))
    return done


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror}; run it as root, or give --root DIR") from None
    return path
