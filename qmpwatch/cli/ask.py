"""`qmpwatch status` and `qmpwatch tail -c FILE`: ask the running daemon, through its local
API socket (`daemon.api_socket` of the configuration it runs with, a unix socket that only
the daemon's user and group may use), never through a TCP port anyone could have taken."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from qmpwatch.core.config import Config
from qmpwatch.core.protection import describe
from qmpwatch.core.text import printable
from qmpwatch.output.console import renderer

EXIT_FINE = 0  # every VM connected and running
EXIT_ATTENTION = 1  # something needs attention
EXIT_UNREACHABLE = 2  # no daemon answers
EXIT_UNKNOWN_VM = 3  # `status NAME` of a VM the daemon does not watch
TIMEOUT_S = 5.0
FOLLOW_AGAIN_S = 1.0  # while the daemon is away, `tail` asks again this often


class Unreachable(Exception):
    """The daemon cannot be asked (not running, no HTTP endpoint, another address)."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the daemon's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _address(config: Config) -> str:
    path = config.daemon.api_socket
    if not path:
        raise Unreachable(
            "daemon.api_socket is empty in this configuration: the daemon serves no local API "
            "to ask"
        )
    return path


def _get(config: Config, path: str) -> tuple[http.client.HTTPConnection, Any]:
    where = _address(config)
    conn = _UnixConnection(where, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
    except OSError as err:
        conn.close()
        why = err.strerror or str(err)
        raise Unreachable(f"no qmpwatch daemon answers on {where} ({why})") from None
    except http.client.HTTPException as err:
        conn.close()
        raise Unreachable(f"{where} does not answer like qmpwatch ({err!r})") from None
    if response.status != 200:
        conn.close()
        raise Unreachable(f"{where}{path} answered {response.status} {response.reason}")
    return conn, response


def fetch_status(config: Config) -> dict[str, Any]:
    """The daemon's status document (`qmpwatch.service.status.snapshot`)."""
    conn, response = _get(config, "/api/v1/status")
    try:
        doc: dict[str, Any] = json.loads(response.read())
        return doc
    except (OSError, ValueError) as err:
        raise Unreachable(f"the daemon's answer could not be read: {err}") from None
    finally:
        conn.close()


def follow(config: Config, vm: str = "") -> Iterator[dict[str, Any]]:
    """The daemon's records (of `vm`, or all VMs) as they are written, until it stops.
    Connects at once: raises `Unreachable` here, not when iterated."""
    path = "/api/v1/records" + (f"?vm={vm}" if vm else "")
    conn, response = _get(config, path)
    return _records(conn, response)


def _records(conn: http.client.HTTPConnection, response: Any) -> Iterator[dict[str, Any]]:
    try:
        if conn.sock is not None:
            conn.sock.settimeout(None)  # records come when they come
        while line := response.readline():
            yield json.loads(line)
    finally:
        conn.close()


def _span(seconds: float) -> str:
    """A duration for people: 42s, 5m 03s, 2h 07m, 3d 4h."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _ago(iso: str | None, now: float) -> str:
    if not iso:
        return "-"
    when = datetime.fromtimestamp(_epoch(iso), UTC)
    return f"{when:%Y-%m-%d %H:%M:%S} ({_span(now - when.timestamp())} ago)"


def _agent_line(port: dict[str, Any] | None, now: float) -> list[str]:
    """The guest agent's port under its VM's line (none: the VM has no agent port known)."""
    if not port:
        return []
    return [f"  agent port {'open' if port['open'] else 'CLOSED'} since {_ago(port['since'], now)}"]


def format_status(doc: dict[str, Any], now: float) -> str:
    """The status document for people: one line per VM, its firing alerts below it."""
    rows = [("VM", "SOURCE", "CONNECTED", "STATUS", "SINCE", "WHY")]
    alerts: dict[int, list[str]] = {}
    for vm in doc["vms"]:
        if vm["connected"]:
            connected = f"yes, {_span(now - _epoch(vm['connected_since']))}"
        else:
            connected = f"NO, since {_ago(vm['disconnected_since'], now)}"
        rows.append(
            (
                vm["vm"],
                vm["source"],
                connected,
                vm["status"],
                _ago(vm.get("status_since"), now),
                vm.get("why") or "",
            )
        )
        alerts[len(rows) - 1] = (
            _agent_line(vm.get("agent_port"), now)
            + [
                f"  ! {a['severity']} {a['alert']} since {_ago(a['since'], now)}: {a['summary']}"
                for a in vm["alerts"]
            ]
            + [
                "  - unprotected: {}: {}".format(*describe(gap))
                for gap in (vm.get("protection") or {}).get("gaps", ())
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5]
        )
        lines.extend(alerts.get(n, []))
    for sink in doc.get("sinks", []):
        if not sink["ok"]:
            last = sink["last_success"]
            since = f", last success {_ago(last, now)}" if last else ", never delivered"
            lines.append(
                f"  ! sink {sink['sink']} FAILING ({sink['pending']} pending{since}): "
                f"{sink['last_error']}"
            )
    firing = sum(len(vm["alerts"]) for vm in doc["vms"])
    attention = doc["attention"]
    lines.append(
        f"{len(doc['vms'])} VM(s) on {doc['host']}, {firing} alert(s) firing; "
        + (f"needs attention: {', '.join(attention)}" if attention else "all connected and running")
    )
    for reason, words in sorted(doc.get("degraded", {}).items()):
        lines.append(f"DEGRADED ({reason}): {words}")
    return "\n".join(printable(line.rstrip()) for line in lines)


def status(config: Config, vms: Sequence[str], *, as_json: bool, out: TextIO) -> int:
    """`qmpwatch status`: print the daemon's view; the exit status says if all is well."""
    try:
        doc = fetch_status(config)
    except Unreachable as err:
        print(f"qmpwatch status: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if vms:
        unknown = sorted(set(vms) - {vm["vm"] for vm in doc["vms"]})
        if unknown:
            print(
                f"qmpwatch status: the daemon watches no VM {', '.join(unknown)}", file=sys.stderr
            )
            return EXIT_UNKNOWN_VM
        doc["vms"] = [vm for vm in doc["vms"] if vm["vm"] in vms]
        doc["attention"] = [name for name in doc["attention"] if name in vms]
    if as_json:
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.write(format_status(doc, time.time()) + "\n")
    failing = any(not sink["ok"] for sink in doc.get("sinks", []))
    return EXIT_ATTENTION if doc["attention"] or failing else EXIT_FINE


def tail(config: Config, vm: str, *, as_json: bool, out: TextIO) -> int:
    """`qmpwatch tail -c FILE`: print the daemon's VM records as they are written, across
    restarts of the daemon (followed again when it is back), until interrupted. Exit 2 when
    no daemon answers at the start."""
    render = renderer(colours=out.isatty())
    gone = ""  # why the daemon went away, while it is away
    first = True
    try:
        while True:
            try:
                records = follow(config, vm)
            except Unreachable as err:
                if first:
                    print(f"qmpwatch tail: {err}", file=sys.stderr)
                    return EXIT_UNREACHABLE
                time.sleep(FOLLOW_AGAIN_S)
                continue
            if gone:
                print("qmpwatch tail: the daemon is back; following it again", file=sys.stderr)
            first, gone = False, ""
            try:
                for record in records:
                    if as_json:
                        out.write(json.dumps(record, separators=(",", ":")) + "\n")
                    else:
                        out.write(render(None, "", dict(record)) + "\n")
                    out.flush()
                gone = "it stopped"
            except (OSError, http.client.HTTPException) as err:
                gone = str(err) or type(err).__name__
            print(
                f"qmpwatch tail: the daemon went away ({gone}); following again when it is "
                "back (Ctrl-C ends)",
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        return EXIT_FINE


def monitor_is_free(path: str, timeout: float = 2.0) -> bool:
    """Whether the QMP monitor at `path` greets a new client within `timeout` (one that
    another client holds, such as the daemon, never does). One connection, closed at once."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return b'"QMP"' in sock.recv(4096)
        except TimeoutError:
            return False  # connected, but no greeting: the monitor has a client
        except OSError:
            return True  # missing, refused, ...: tail's own attempts say why, and retry
