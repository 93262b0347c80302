"""A fake QEMU that dials in to a `[[listen]]` socket, as `-chardev socket,reconnect=1` does.

    qemu-system-x86_64 -I -S bench/dialin.py SOCKET -name NAME [--retry-s 1.0]

The program must be started through a link named like QEMU (`bench.qemu_lookalike`): the daemon
reads `/proc/PID/cmdline` of every peer, wants a program called `qemu...` or `kvm`, and takes
the VM's name from `-name`. It connects to SOCKET (again every `--retry-s` while that fails,
and after every hang-up, as QEMU's `reconnect` does), sends QEMU 7.2's greeting and answers
`qmp_capabilities`, `query-status` (`running`) and `query-version`; anything else gets a
CommandNotFound error. It prints one line (`up PID`) once started, so that a benchmark can
tell when all of its fake QEMUs are up. It sends no events, and exits when the process that
started it has gone (a benchmark that was interrupted leaves none behind).

Blocking, and as small as a Python process gets (about 4 MiB of private memory with `-I -S`;
no argparse, pathlib or typing, which would add 1.5 MiB): the benchmark runs hundreds, each a
process of its own so that each connection has its own peer PID and command line.
`bench.fakeqmp` uses the same replies.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
    b'"capabilities": ["oob"]}}\r\n'
)
VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}


def reply(cmd: dict[str, object], status: str = "running") -> dict[str, object]:
    """QEMU's answer to one command (with its `id`), for the commands a watcher sends."""
    name = cmd.get("execute")
    answer: dict[str, object]
    if name == "qmp_capabilities":
        answer = {"return": {}}
    elif name == "query-status":
        answer = {"return": {"status": status, "singlestep": False, "running": status == "running"}}
    elif name == "query-version":
        answer = {"return": VERSION}
    else:
        answer = {
            "error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}
        }
    if "id" in cmd:
        answer["id"] = cmd["id"]
    return answer


def _serve(conn: socket.socket) -> None:
    """One connection: the greeting, then answers, until the peer hangs up."""
    conn.sendall(GREETING)
    decoder = json.JSONDecoder()
    buffer = ""
    while data := conn.recv(65536):
        buffer += data.decode("utf-8", "replace")
        while buffer := buffer.lstrip():
            try:
                cmd, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                break  # the rest of the command is still on its way
            buffer = buffer[end:]
            if isinstance(cmd, dict):
                conn.sendall(json.dumps(reply(cmd)).encode() + b"\r\n")


def main(argv: list[str]) -> None:
    """argv: SOCKET -name NAME [--retry-s SECONDS]"""
    path, options = argv[0], dict(zip(argv[1::2], argv[2::2], strict=True))
    retry_s = float(options.get("--retry-s", 1.0))
    parent = os.getppid()
    sys.stdout.write(f"up {os.getpid()}\n")
    sys.stdout.flush()
    while os.getppid() == parent:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError:
            conn.close()
            time.sleep(retry_s)
            continue
        try:
            _serve(conn)
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(retry_s)


if __name__ == "__main__":
    main(sys.argv[1:])
