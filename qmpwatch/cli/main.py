"""The command line: `qmpwatch run | check-config | status | tail | replay | demo`.

The only module that calls `sys.exit` (through `main`'s return value) and prints for people.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from qmpwatch import __version__
from qmpwatch.core.config import DEFAULT_PATH, Config, NoShutdown, load_config
from qmpwatch.core.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmpwatch",
        description="Watch QEMU QMP monitors: log every event, check the follow-ups the QMP "
        "events document promises, and alert when a VM stops unexpectedly.",
    )
    parser.add_argument(
        "--version", action="version", version=f"qmpwatch {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (each has --help)"
    )

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_PATH,
            help=f"configuration file (default: {DEFAULT_PATH})",
        )

    run = sub.add_parser("run", help="run the daemon")
    config_arg(run)
    run.add_argument(
        "--log-format",
        choices=("json", "console"),
        help='override daemon.log_format (not with daemon.log_target = "journal")',
    )

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file; exit 0 when valid, 2 when not. With --probe "
        "also check, as the user running it, what it points at; exit 1 if that fails.",
    )
    config_arg(check)
    check.add_argument(
        "--probe",
        action="store_true",
        help="also check the world: each VM socket exists and accepts a connection (closed at "
        "once), state_dir is writable, each sink's host answers a TCP connect; run it as the "
        "service's user",
    )

    rep = sub.add_parser(
        "replay",
        help="feed captured QMP messages through the decoder and tracker, print the records",
        description="Feed QMP messages (one JSON object per line, as QEMU writes them) through "
        "the decoder and the follow-up tracker, with QEMU's timestamps as the clock, and print "
        "the records the daemon would log.",
    )
    rep.add_argument("file", help="captured stream, or - for standard input")
    rep.add_argument("--vm", default="replay", help="VM name for the records (default: replay)")
    rep.add_argument(
        "--no-shutdown",
        action="store_true",
        help="the VM ran with -no-shutdown (SHUTDOWN must be followed by STOP)",
    )
    rep.add_argument(
        "-c",
        "--config",
        type=Path,
        help="take follow-up deadlines, [lifecycle] and [alert] settings from this file",
    )
    rep.add_argument(
        "--log-format",
        choices=("json", "console"),
        default="json",
        help="JSON lines (default) or one line per record for people",
    )

    status = sub.add_parser(
        "status",
        help="ask the running daemon which VMs are connected, their status, why, and alerts",
        description="Ask the running daemon (through daemon.api_socket of FILE, a unix "
        "socket; never a TCP port) for every "
        "VM: its source, whether it is connected and since when, its run status, why and since "
        "when, and its firing alerts; and how each alert sink fares. Exit 0 when every VM is "
        "connected and running and every sink delivers, 1 when something needs attention, 2 "
        "when the daemon cannot be reached, 3 when a VM named is not watched.",
    )
    config_arg(status)
    status.add_argument("vms", nargs="*", metavar="VM", help="only these VMs (default: all)")
    status.add_argument(
        "--json", action="store_true", help="print the status document (version 1) as JSON"
    )

    tail = sub.add_parser(
        "tail",
        help="follow the running daemon's VM records, or attach to monitor sockets ad hoc",
        description="Without SOCKET: follow the records of the daemon that FILE configures "
        "(events, follow-ups, alerts; through its daemon.api_socket), one line each (coloured "
        "on a terminal, control characters escaped), beside it and "
        "without a monitor of its own, across restarts of the daemon, until Ctrl-C (exit 2 "
        "when no daemon answers at the start). With SOCKET...: attach to those QMP monitors "
        "directly (VM name = socket file name without extension); a monitor that another "
        "client, such as the daemon, holds is refused at once.",
    )
    config_arg(tail)
    tail.add_argument(
        "sockets", nargs="*", metavar="SOCKET", help="attach to these QMP monitor unix sockets"
    )
    tail.add_argument("--vm", default="", help="only this VM's records (following the daemon)")
    tail.add_argument("--json", action="store_true", help="print JSON lines instead")
    tail.add_argument(
        "--no-shutdown",
        choices=("auto", "true", "false"),
        default="auto",
        help='with SOCKET: whether QEMU runs with -no-shutdown ("auto": read its command line)',
    )

    demo = sub.add_parser(
        "demo",
        help="start a throwaway real QEMU and walk it through the documented sequences",
    )
    demo.add_argument(
        "--log-format",
        choices=("json", "console"),
        default="json",
        help="the daemon's log on stdout: JSON lines (default) or one line per record",
    )
    demo.add_argument(
        "--real-guest",
        action="store_true",
        help="tell the story with real Linux guests (a kernel panic, a watchdog, a full disk "
        "resumed; the disk as root only); fetches a Debian kernel and busybox on first use",
    )
    demo.add_argument(
        "--guest-dir",
        type=Path,
        default=Path(".cache/guest"),
        help="with --real-guest: where the guest's kernel and initramfs are kept "
        "(default .cache/guest)",
    )
    return parser


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    yield from stream


def _check_config(path: Path, *, probe: bool = False) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as err:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    sinks = len(cfg.alert.webhook) + len(cfg.alert.alertmanager) + len(cfg.alert.exec)
    print(
        f"{path}: OK ({len(cfg.vms)} VM(s), {len(cfg.discover)} discovery glob(s), "
        f"{len(cfg.listen)} listen socket(s), {len(cfg.libvirt)} libvirt connection(s), "
        f"{sinks} alert sink(s))"
    )
    if not probe:
        return EXIT_OK
    import asyncio

    from qmpwatch.cli.probe import probe as probe_world

    report = asyncio.run(probe_world(cfg))
    if report.problems:
        print(f"{path}: probe found problems:", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{path}: probe OK ({', '.join(report.checked)})")
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from qmpwatch.cli.replay import replay
    from qmpwatch.output import logs

    config = Config()
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as err:
            print("\n".join(err.problems), file=sys.stderr)
            return EXIT_CONFIG
    writer = logs.configure(args.log_format, sys.stdout.buffer)
    try:
        if args.file == "-":
            replay(
                _lines(sys.stdin.buffer), vm=args.vm, no_shutdown=args.no_shutdown, config=config
            )
        else:
            with open(args.file, "rb") as stream:
                replay(_lines(stream), vm=args.vm, no_shutdown=args.no_shutdown, config=config)
    except OSError as err:
        print(f"qmpwatch replay: {args.file}: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        writer.flush()
    return EXIT_OK


def _load_or_report(path: Path, command: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as err:
        print(f"qmpwatch {command}: {path}: " + "; ".join(err.problems), file=sys.stderr)
        return None


def _tail(args: argparse.Namespace) -> int:
    from qmpwatch.cli import ask

    if not args.sockets:
        config = _load_or_report(args.config, "tail")
        if config is None:
            return ask.EXIT_UNREACHABLE
        return ask.tail(config, args.vm, as_json=args.json, out=sys.stdout)
    held = [path for path in args.sockets if not ask.monitor_is_free(path)]
    if held:
        for path in held:
            print(
                f"qmpwatch tail: {path}: no QMP greeting: another client holds this monitor "
                "(the qmpwatch daemon?); follow the daemon instead: qmpwatch tail -c CONFIG",
                file=sys.stderr,
            )
        return EXIT_FAILURE
    from qmpwatch.service.daemon import run_tail

    no_shutdown: NoShutdown = "auto" if args.no_shutdown == "auto" else args.no_shutdown == "true"
    return run_tail(args.sockets, json=args.json, no_shutdown=no_shutdown)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qmpwatch` console script."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config, probe=args.probe)
    if args.command == "replay":
        return _replay(args)
    if args.command == "run":
        from qmpwatch.service.daemon import run_daemon

        return run_daemon(args.config, log_format=args.log_format)
    if args.command == "status":
        from qmpwatch.cli import ask

        config = _load_or_report(args.config, "status")
        if config is None:
            return ask.EXIT_UNREACHABLE
        return ask.status(config, args.vms, as_json=args.json, out=sys.stdout)
    if args.command == "tail":
        return _tail(args)
    if args.command == "demo":
        if args.real_guest:
            from qmpwatch.cli.realdemo import run_real_demo

            return run_real_demo(args.log_format, args.guest_dir)
        from qmpwatch.cli.demo import run_demo

        return run_demo(args.log_format)
    raise AssertionError(f"unhandled command {args.command}")
