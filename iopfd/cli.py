"""The ``iopfd`` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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

    from iopfd.service.config import EX_CONFIG, ConfigError, load_settings
    from iopfd.service.logging import configure_logging
    from iopfd.service.server import PolicyError, UsageError, prepare

    def load():
        return load_settings(args.config, policy=args.policy, metrics_address=args.metrics_address)

    try:
        settings = load()
        configure_logging(settings.log_level, settings.log_format)
        server = prepare(settings, args.fault_fd, args.report, reload_settings=load if args.config else None,
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
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(f"{str(cell):<{width}}" for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


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
    from iopfd.service.config import EX_CONFIG, ConfigError, load_settings
    from iopfd.service.server import PolicyError, build_policies

    try:
        settings = load_settings(args.file)
        build_policies(settings)  # queues name only tables or built-ins: the config checked that
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from iopfd import demo

    return demo.main(here=args.here, kernel=args.kernel, duration=args.duration)


def _cmd_bench(args: argparse.Namespace) -> int:
    from iopfd.bench import cli as bench
    from iopfd.bench.run import SCENARIOS, Tools

    tools = Tools(*args.tools.split(":")) if args.tools else None
    return bench.main(here=args.here, kernel=args.kernel, scenarios=args.scenarios or list(SCENARIOS),
                      groups=args.groups, rate=args.rate, out=args.out, png=args.png, emulated=args.emulated,
                      guard=args.guard, tools=tools, repeat=args.repeat)


def _cmd_lab(args: argparse.Namespace) -> int:
    from iopfd.lab import kernel, vm
    from iopfd.lab.errors import LabError

    try:
        if args.lab_command == "build":
            built = kernel.ensure_built(args.kernel)
            print(built.directory)
            return 0
        return vm.run(args.argv, kernel=args.kernel, timeout=args.timeout)
    except LabError as exc:
        print(f"iopfd lab: {exc}", file=sys.stderr)
        return 1


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1")
    return int(text)


def _positive_number(text: str) -> float:
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


def _scenario(text: str) -> str:
    from iopfd.bench.run import SCENARIOS

    if text not in SCENARIOS:
        raise argparse.ArgumentTypeError(f"{text!r}: scenarios are {', '.join(SCENARIOS)}")
    return text


def _fault_fd(text: str):
    from iopfd.service.server import FaultFdArg

    try:
        return FaultFdArg.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _forward_fd(text: str):
    from iopfd.service.server import ForwardFdArg

    try:
        return ForwardFdArg.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _forward_events_fd(text: str):
    from iopfd.service.server import ForwardEventsFdArg

    try:
        return ForwardEventsFdArg.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    from iopfd.lab.kernel import DEFAULT_KERNEL, KERNELS

    parser = argparse.ArgumentParser(prog="iopfd", description="User-space IOMMUFD I/O page-fault delivery daemon")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('iopfd')}")

    def add_kernel(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kernel", choices=sorted(KERNELS), default=DEFAULT_KERNEL,
                       help="lab kernel (default: %(default)s)")

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
    p.add_argument("--report", metavar="FILE", help="at exit, write what each queue did (counts, latency "
                   "percentiles, CPU time, peak RSS) as JSON; used by iopfd bench")
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
        p.add_argument("--timeout", type=_positive_number, default=10, help="seconds to wait for the daemon "
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

    p = sub.add_parser("demo", help="the daemon answering a stream of mock faults in the kernel lab, live")
    p.add_argument("--here", action="store_true", help="run on this kernel instead of booting the lab")
    add_kernel(p)
    p.add_argument("--duration", type=_positive_number, default=10, help="seconds of faults (default: %(default)s; "
                   "Ctrl-C stops early)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="iopfd against a C responder on the lab kernel's fault path, and on the "
                       "emulated queue")
    p.add_argument("scenarios", nargs="*", type=_scenario, metavar="SCENARIO",
                   help="burst, steady, storm, multi (default: all)")
    p.add_argument("--here", action="store_true", help="run on this kernel instead of booting the lab")
    add_kernel(p)
    p.add_argument("--groups", type=_positive, default=200_000, help="fault groups per run (default: %(default)s)")
    p.add_argument("--rate", type=_positive_number, default=20_000,
                   help="steady: groups/s offered (default: %(default)s)")
    p.add_argument("--repeat", type=_positive, default=3, help="runs of burst and multi; the median run is reported "
                   "(default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON (default: bench-results.json)")
    p.add_argument("--png", metavar="FILE", help="draw the chart here (default with the lab: the JSON's name, .png)")
    p.add_argument("--no-emulated", dest="emulated", action="store_false",
                   help="skip the runs on the emulated queue")
    p.add_argument("--guard", action="store_true", help="the short CI run: burst and storm only; exit 1 if iopfd's "
                   "burst throughput is below 0.4 of the C floor's or a storm group is late")
    p.add_argument("--tools", help=argparse.SUPPRESS)  # RESPONDER:TRIGGER, compiled on the host for the guest
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("lab", help="the kernel lab: build the mock-IOMMU kernel, run commands inside it")
    lab_sub = p.add_subparsers(dest="lab_command", required=True)
    b = lab_sub.add_parser("build", help="build (or find in the cache) a lab kernel; prints its cache directory")
    add_kernel(b)
    r = lab_sub.add_parser("run", help="boot a lab kernel and run a command in it (this checkout as cwd)")
    add_kernel(r)
    r.add_argument("--timeout", type=_positive_number, default=1800, help="seconds before the guest is killed")
    r.add_argument("argv", nargs="+", metavar="COMMAND", help="the command and its arguments")
    p.set_defaults(func=_cmd_lab)
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
