"""Generate ``man/iopfd.8`` from the ``iopfd`` argparse parser, with the prose sections below.

The page is committed and shipped in the wheel (``iopfd install-units`` installs it);
tests/unit/test_packaging.py fails when it no longer matches the parser.

    uv run python man/build_manpage.py
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

TARGET = Path(__file__).resolve().parent / "iopfd.8"

DESCRIPTION = """\
Since Linux 6.11 iommufd delivers I/O page faults raised on a user-managed (nested) page table to
user space through a fault fd. The kernel never times a fault group out: a group nobody answers
stalls the device.
.B iopfd
reads the fault groups, resolves each through a policy (accept, reject, rules, forward to the VMM,
ioas-map demand paging, or a plug-in) and answers every group it reads, with per-queue deadlines,
back-pressure, a graceful stop and crash recovery through systemd's fd store.
.PP
It runs as a host service (iopfd.service, socket-activated by iopfd.socket), where VMMs hand their
fault fds over the control socket, or as a sidecar that a VMM starts with its fault fd inherited.
Prometheus metrics are served on 127.0.0.1:9769 by default."""

EXIT_STATUS = [
    ("0", "success; for run, a clean stop: every group read was answered"),
    ("1", "install-units could not write a file; status or detach could not reach the daemon"),
    ("2", "bad arguments, or for run: no queue to serve, an fd that is not a fault fd, "
          "a control socket another iopfd listens on"),
    ("78", "configuration error (EX_CONFIG), printed as path.to.field: message lines; "
           "the unit's RestartPreventExitStatus=78 keeps systemd from restarting on it"),
]

ENVIRONMENT = [
    ("IOPFD_*", "any configuration key, above the file and below the flags: IOPFD_POLICY=reject, "
                "nested keys joined by __ (IOPFD_DEFAULTS__MAX_PENDING=10), lists and tables as JSON"),
    ("NOTIFY_SOCKET, WATCHDOG_USEC", "set by systemd: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 and the fd store"),
    ("LISTEN_FDS, LISTEN_FDNAMES", "set by systemd: the control socket from iopfd.socket and the fault fds "
                                   "handed back from the fd store after a restart"),
]

FILES = [
    ("/etc/iopfd/iopfd.toml", "the host service's configuration"),
    ("/usr/local/share/doc/iopfd/examples/", "iopfd.toml (every key, documented), iopfd-host.toml, "
                                             "iopfd-sidecar.toml"),
    ("/etc/systemd/system/iopfd.service, iopfd.socket", "the units, as install-units writes them"),
    ("/run/iopfd/control.sock", "the control socket (iopfd.socket)"),
    ("/run/iopfd/state.json", "the highest cookie read per queue, for the sweep after a crash"),
]

SEE_ALSO = "systemctl(1), systemd.service(5), systemd.socket(5), journalctl(1)"


def escape(text: str) -> str:
    """Text as troff reads it literally: backslashes doubled, no line taken for a request."""
    lines = text.replace("\\", "\\e").split("\n")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def option(text: str) -> str:
    return escape(text).replace("-", "\\-")


def metavar(action: argparse.Action) -> str:
    if action.metavar:
        return action.metavar
    if action.choices:
        return "{" + ",".join(sorted(action.choices)) + "}"
    return action.dest.upper()


def usage(action: argparse.Action) -> str:
    """One argument as the synopsis shows it, like argparse's usage line but never wrapped."""
    if not action.option_strings:
        shown = metavar(action)
        return {"*": f"[{shown} ...]", "+": f"{shown} ...", "?": f"[{shown}]"}.get(action.nargs, shown)
    flag = action.option_strings[-1]
    return f"[{flag}]" if action.nargs == 0 else f"[{flag} {metavar(action)}]"


def help_text(action: argparse.Action, prog: str) -> str:
    return (action.help or "") % {**vars(action), "prog": prog}


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order the parser lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def command(lines: list[str], words: str, summary: str, parser: argparse.ArgumentParser) -> None:
    nested = subcommands(parser)
    if nested:
        for name, summary_of, sub in nested:
            command(lines, f"{words} {name}", summary_of, sub)
        return
    synopsis = " ".join([words, *(usage(a) for a in arguments(parser))])
    lines += [".TP", f".B {option(synopsis)}", escape(summary)]
    for action in arguments(parser):
        shown = ", ".join(action.option_strings) or metavar(action)
        if action.option_strings and action.nargs != 0:
            shown += f" {metavar(action)}"
        lines += [".RS", ".TP", f".B {option(shown)}", escape(help_text(action, parser.prog)), ".RE"]


def definitions(lines: list[str], items: list[tuple[str, str]]) -> None:
    for term, text in items:
        lines += [".TP", f".B {escape(term)}", escape(text)]


def render(parser: argparse.ArgumentParser) -> str:
    lines = [
        '.\\" Generated by man/build_manpage.py from the iopfd argparse parser; do not edit.',
        f'.TH IOPFD 8 "" "iopfd {version("iopfd")}" "System Administration"',
        ".SH NAME",
        f"iopfd \\- {escape(parser.description[0].lower() + parser.description[1:])}",
        ".SH SYNOPSIS",
        ".B iopfd",
        "\\-\\-version",
        ".br",
        ".B iopfd",
        ".I COMMAND",
        "[\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        DESCRIPTION,
        ".SH COMMANDS",
    ]
    for name, summary, sub in subcommands(parser):
        command(lines, f"iopfd {name}", summary, sub)
    lines.append(".SH EXIT STATUS")
    definitions(lines, EXIT_STATUS)
    lines.append(".SH ENVIRONMENT")
    definitions(lines, ENVIRONMENT)
    lines.append(".SH FILES")
    definitions(lines, FILES)
    lines += [".SH SEE ALSO", SEE_ALSO, ""]
    return "\n".join(lines)


def generate(target: Path = TARGET) -> None:
    from iopfd.cli import build_parser

    target.write_text(render(build_parser()))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
