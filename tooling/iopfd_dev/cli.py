"""The ``iopfd-dev`` command: the kernel lab, the benchmarks and the demo. Development tooling, never
part of the product: the daemon does not import it."""

from __future__ import annotations

import argparse
import sys

from iopfd.cli import positive_number


def _cmd_demo(args: argparse.Namespace) -> int:
    from iopfd_dev import demo

    return demo.main(here=args.here, kernel=args.kernel, duration=args.duration)


def _cmd_bench(args: argparse.Namespace) -> int:
    from iopfd_dev.bench import cli as bench
    from iopfd_dev.bench.run import POLICIES, SCENARIOS
    from iopfd_dev.bench.tools import Tools
    from iopfd_dev.lab.kernel import KERNELS

    tools = Tools.parse(args.tools) if args.tools else None
    return bench.main(here=args.here, kernels=args.kernels or list(KERNELS),
                      scenarios=args.scenarios or list(SCENARIOS),
                      policies=args.policies or list(POLICIES), groups=args.groups, out=args.out, png=args.png,
                      emulated=args.emulated, guard=args.guard, tools=tools, repeat=args.repeat,
                      seed_faults=args.seed_faults, profile=args.profile)


def _cmd_lab(args: argparse.Namespace) -> int:
    from iopfd_dev.lab import kernel, vm
    from iopfd_dev.lab.errors import LabError

    try:
        if args.lab_command == "build":
            built = kernel.ensure_built(args.kernel)
            print(built.directory)
            return 0
        return vm.run(args.argv, kernel=args.kernel, timeout=args.timeout, systemd=args.systemd)
    except LabError as exc:
        print(f"iopfd-dev lab: {exc}", file=sys.stderr)
        return 1


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1")
    return int(text)


def _scenario(text: str) -> str:
    from iopfd_dev.bench.run import SCENARIOS

    if text not in SCENARIOS:
        raise argparse.ArgumentTypeError(f"{text!r}: scenarios are {', '.join(SCENARIOS)}")
    return text


def _policies(text: str) -> list[str]:
    from iopfd_dev.bench.run import POLICIES

    names = text.split(",")
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: policies are {', '.join(POLICIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from iopfd_dev.lab.kernel import DEFAULT_KERNEL, KERNELS

    parser = argparse.ArgumentParser(prog="iopfd-dev", description="iopfd's development tooling: the kernel lab, "
                                     "the benchmarks and the demo")

    def add_kernel(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kernel", choices=sorted(KERNELS), default=DEFAULT_KERNEL,
                       help="lab kernel (default: %(default)s)")

    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the daemon answering a stream of mock faults in the kernel lab, live")
    p.add_argument("--here", action="store_true", help="run on this kernel instead of booting the lab")
    add_kernel(p)
    p.add_argument("--duration", type=positive_number, default=10, help="seconds of faults (default: %(default)s; "
                   "Ctrl-C stops early)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="iopfd with each policy against C loops on the lab kernels' fault path, "
                       "and on the emulated queue")
    p.add_argument("scenarios", nargs="*", type=_scenario, metavar="SCENARIO",
                   help="burst, steady, storm, multi, seed (default: all)")
    p.add_argument("--here", action="store_true", help="run on this kernel instead of booting the lab")
    p.add_argument("--kernel", dest="kernels", action="append", choices=sorted(KERNELS),
                   help="lab kernel, repeatable (default: every lab kernel, one boot each)")
    p.add_argument("--policies", type=_policies, default=None, metavar="P,...",
                   help="iopfd's policies to run (default: all of accept, reject, rules, plugin, forward, forward-py, "
                        "ioas-map)")
    p.add_argument("--groups", type=_positive, default=50_000, help="fault groups per burst, storm and multi run, "
                   "and at most per steady run (default: %(default)s)")
    p.add_argument("--repeat", type=_positive, default=3, help="runs of burst and multi; the median run is reported "
                   "(default: %(default)s)")
    p.add_argument("--seed-faults", type=_positive, default=200, help="seed: faults each thread raises "
                   "(default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON (default: bench-results.json)")
    p.add_argument("--png", metavar="FILE", help="draw the chart here (default with the lab: the JSON's name, .png)")
    p.add_argument("--no-emulated", dest="emulated", action="store_false",
                   help="skip the runs on the emulated queue")
    p.add_argument("--guard", action="store_true", help="the short CI run: burst of the C floor and of accept, rules "
                   "and forward, and the storm; exit 1 if a policy falls below its share of the C floor's throughput "
                   "or answers any group late")
    p.add_argument("--profile", metavar="FILE", help="profile iopfd's daemon with cProfile from READY=1 to its stop, "
                   "write the stats to FILE (one file per kernel: FILE-KERNEL) and print its costliest functions")
    # RESPONDER:TRIGGER:PEER:MAPPER, compiled on the host for the guest
    p.add_argument("--tools", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("lab", help="the kernel lab: build the mock-IOMMU kernel, run commands inside it")
    lab_sub = p.add_subparsers(dest="lab_command", required=True)
    b = lab_sub.add_parser("build", help="build (or find in the cache) a lab kernel; prints its cache directory")
    add_kernel(b)
    r = lab_sub.add_parser("run", help="boot a lab kernel and run a command in it (this checkout as cwd)")
    add_kernel(r)
    r.add_argument("--timeout", type=positive_number, default=1800, help="seconds before the guest is killed")
    r.add_argument("--systemd", action="store_true",
                   help="boot with the host's systemd as PID 1 and run the command as a service of it")
    r.add_argument("argv", nargs="+", metavar="COMMAND", help="the command and its arguments")
    p.set_defaults(func=_cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
