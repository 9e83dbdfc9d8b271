"""The ``iopfd`` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_probe(args: argparse.Namespace) -> int:
    from iopfd.iommufd.probe import probe

    features = probe(args.device)
    if args.json:
        print(json.dumps({"device": args.device, "features": [
            {"name": f.name, "status": f.status, "detail": f.detail} for f in features]}, indent=2))
        return 0
    width = max(len(f.name) for f in features)
    print(f"{'feature':<{width}}  {'status':<7}  detail")
    for f in features:
        print(f"{f.name:<{width}}  {f.status:<7}  {f.detail}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from iopfd.policies import PolicyError
    from iopfd.service.arguments import UsageError
    from iopfd.service.config import EX_CONFIG, ConfigError, load_settings
    from iopfd.service.logging import configure_logging
    from iopfd.service.prepare import prepare

    def load():
        return load_settings(args.config, policy=args.policy, metrics_address=args.metrics_address)

    try:
        settings = load()
        configure_logging(settings.log_level, settings.log_format)
        server = prepare(settings, args.fault_fd, reload_settings=load if args.config else None,
                         forward_fds=args.forward_fd, forward_events_fds=args.forward_events_fd)
        return asyncio.run(server.serve())  # ConfigError too: the metrics address cannot be listened on
    except (ConfigError, PolicyError) as exc:
        print(f"iopfd run: invalid configuration\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except UsageError as exc:
        print(f"iopfd run: {exc}", file=sys.stderr)
        return 2


def _control_request(args: argparse.Namespace, method: str, *params) -> dict | None:
    """One request to the daemon's control socket; None (and the reason on stderr) if it failed."""
    from iopfd.client import Client
    from iopfd.protocol import ProtocolError

    try:
        with Client(args.socket, timeout=args.timeout) as client:
            return getattr(client, method)(*params)
    except ProtocolError as exc:
        print(f"iopfd {args.command}: iopfd refused: {exc.message} ({exc.code})", file=sys.stderr)
    except PermissionError:
        print(f"iopfd {args.command}: {args.socket}: permission denied; run as root or as a user of the socket's "
              "group (SocketGroup= in iopfd.socket, [control] allowed_gids)", file=sys.stderr)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"iopfd {args.command}: nothing listens on {args.socket}; is iopfd running? (--socket PATH)",
              file=sys.stderr)
    except OSError as exc:
        print(f"iopfd {args.command}: {args.socket}: {exc.strerror or exc}", file=sys.stderr)
    return None


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines: list[Sequence[object]] = [header, *rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(*lines)]
    return "\n".join("  ".join(f"{cell!s:<{width}}" for cell, width in zip(row, widths)).rstrip() for row in lines)


def _cmd_status(args: argparse.Namespace) -> int:
    from iopfd.engine.stats import OUTCOMES

    reply = _control_request(args, "status")
    if reply is None:
        return 1
    reply = {key: value for key, value in reply.items() if key not in ("ok", "id")}
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    rows = [[q["name"], q["policy"], "yes" if q["reading"] else "no", q["pending"], q["faults"],
             *(q["outcomes"].get(o, 0) for o in OUTCOMES), q["write_errors"]] for q in reply["queues"]]
    totals = reply["totals"]
    rows.append(["(all)", "", "", totals["pending"], totals["faults"], *(totals.get(o, 0) for o in OUTCOMES), ""])
    print(_table(["queue", "policy", "reading", "pending", "faults", *OUTCOMES, "write_errors"], rows))
    return 0


def _cmd_detach(args: argparse.Namespace) -> int:
    from iopfd.engine.stats import OUTCOMES

    reply = _control_request(args, "detach", args.queue)
    if reply is None:
        return 1
    reply = {key: value for key, value in reply.items() if key not in ("ok", "id")}
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(f"queue {reply['queue']} detached; every group it read was answered")
    print(_table(["faults", *OUTCOMES], [[reply["faults"], *(reply["outcomes"].get(o, 0) for o in OUTCOMES)]]))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from iopfd.policies import Policies, PolicyError
    from iopfd.service.config import EX_CONFIG, ConfigError, load_settings

    try:
        settings = load_settings(args.file)
        # Queues name only tables or built-ins: the config checked that.
        Policies.build_all(settings.policy_tables, settings.policy)
    except (ConfigError, PolicyError) as exc:
        where = args.file if getattr(exc, "in_file", True) else f"the environment (not {args.file})"
        print(f"{where}: invalid configuration\n{exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"{args.file}: ok ({len(settings.queues)} queue(s), {len(settings.policies)} policy table(s))")
    return 0


def _cmd_install_units(args: argparse.Namespace) -> int:
    from iopfd.service.install import EXAMPLES_DIR, InstallError, hidden_from_service, install, running_binary

    binary = running_binary()
    for warning in hidden_from_service(binary):
        print(f"iopfd install-units: warning: {warning}", file=sys.stderr)
    try:
        installed = install(args.root, binary)
    except InstallError as exc:
        print(f"iopfd install-units: {exc}", file=sys.stderr)
        return 1
    for item in installed:
        print(f"kept {item.path}: it exists (the shipped one is {args.root / EXAMPLES_DIR}/iopfd-host.toml)"
              if item.kept else f"installed {item.path}")
    print(f"ExecStart={binary}")
    if args.root == Path("/"):
        print("next: iopfd check-config /etc/iopfd/iopfd.toml && systemctl daemon-reload "
              "&& systemctl enable --now iopfd.socket iopfd.service")
    return 0


def positive_number(text: str) -> float:
    """Seconds or a rate: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a number above 0, e.g. 10 or 0.5")
    return value


def _queue_name(text: str) -> str:
    from iopfd.service.config import NAME_RULE, is_name

    if not is_name(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a queue name is {NAME_RULE}")
    return text


def _fault_fd(text: str):
    from iopfd.service.arguments import FaultFdArg

    try:
        return FaultFdArg.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _forward_fd(text: str):
    from iopfd.service.arguments import ForwardFdArg

    try:
        return ForwardFdArg.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _forward_events_fd(text: str):
    from iopfd.service.arguments import ForwardEventsFdArg

    try:
        return ForwardEventsFdArg.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="iopfd", description="User-space IOMMUFD I/O page-fault delivery daemon")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('iopfd')}")

    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="show what the running kernel offers (iommufd, fault queues, vEVENTQ, ...)")
    p.add_argument("--device", default="/dev/iommu", help="iommufd device node (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the features as JSON")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("run", help="serve fault queues: read fault groups, decide them, answer them")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (every key: the example iopfd.toml)")
    p.add_argument("--fault-fd", metavar="N[:NAME]", action="append", default=[], type=_fault_fd,
                   help="serve the inherited fault fd N as queue NAME (repeatable)")
    p.add_argument("--forward-fd", metavar="N:POLICY[:RECORDS]", action="append", default=[], type=_forward_fd,
                   help="the inherited socket N (one end of a SOCK_SEQPACKET socketpair) is the peer channel of the "
                   "forward policy POLICY; the peer reads RECORDS fault records at once (default 256; repeatable)")
    p.add_argument("--forward-events-fd", metavar="M:POLICY", action="append", default=[], type=_forward_events_fd,
                   help="the inherited socket M carries the vEVENTs of POLICY (given --forward-fd) to its peer")
    p.add_argument("--policy", metavar="NAME", help="default policy for queues that name none (default: accept)")
    p.add_argument("--metrics-address", metavar="HOST:PORT|off",
                   help="Prometheus endpoint (default: 127.0.0.1:9769)")
    p.set_defaults(func=_cmd_run)

    for name, func, help_text in (
            ("status", _cmd_status, "what the running daemon serves: its queues and their counts (control socket)"),
            ("detach", _cmd_detach, "stop serving a queue: its pending groups are answered, its fd closed "
                                    "(control socket)")):
        p = sub.add_parser(name, help=help_text)
        if name == "detach":
            p.add_argument("queue", metavar="QUEUE", type=_queue_name, help="the queue's name, as `iopfd status` shows")
        p.add_argument("--socket", metavar="PATH", default="/run/iopfd/control.sock",
                       help="the daemon's control socket (default: %(default)s)")
        p.add_argument("--timeout", type=positive_number, default=10, help="seconds to wait for the daemon "
                       "(default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
        p.set_defaults(func=func)

    p = sub.add_parser("check-config", help="validate a configuration file and its policies, then exit")
    p.add_argument("file", metavar="FILE", help="the TOML file, as given to run --config")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("install-units", help="install the systemd units (ExecStart: this iopfd), the host "
                       "config if absent, the example configs and the man page")
    p.add_argument("--root", metavar="DIR", type=Path, default=Path("/"),
                   help="install under DIR instead of / (the units still name this iopfd and /etc/iopfd)")
    p.set_defaults(func=_cmd_install_units)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `iopfd status | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush cannot fail
        return 1


if __name__ == "__main__":
    sys.exit(main())
