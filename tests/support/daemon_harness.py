"""The real daemon under test: `python -m qmpwatch run` as a subprocess, its JSON log read live.

Tests observe qmpwatch the way an operator does: through the JSON lines it writes. Waiting is
on conditions with deadlines (`wait_for`), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qmpwatch.lab import LabVM

Record = dict[str, Any]
# Reconnect at once: tests wait on conditions, not on the daemon's backoff.
FAST_CONNECT = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
ANY_PORT = "127.0.0.1:0"  # metrics_listen: a free port, which `DaemonProcess.metrics_port` reads
ROOT = Path(__file__).resolve().parents[2]
PIPE_LINE_LIMIT = 16 * 1024 * 1024  # a log line can carry a 1 MiB event (and more)
#: The daemon as an unprivileged user (nobody, no groups), as the service runs it: it can
#: signal no other user's process. Its one capability, CAP_DAC_READ_SEARCH, only lets it reach
#: this checkout's interpreter (a fresh clone lives under /root, mode 0700).
NOBODY = 65534
UNPRIVILEGED = (
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
)  # fmt: skip


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return repr(value)


def write_config(
    path: Path,
    *,
    state_dir: Path,
    vms: Sequence[Mapping[str, object]] = (),
    discover: Sequence[Mapping[str, object]] = (),
    sections: Mapping[str, Mapping[str, object]] | None = None,
    arrays: Mapping[str, Sequence[Mapping[str, object]]] | None = None,
) -> Path:
    """A config file with fast test timings; `sections`/`arrays` add or override tables."""
    tables: dict[str, dict[str, object]] = {
        "daemon": {
            "state_dir": str(state_dir),
            "metrics_listen": "",
            # Each daemon its own local API socket (none where the path would be too long).
            "api_socket": api if len(api := str(state_dir.parent / "api.sock")) < 100 else "",
        },
        "connect": {"timeout_s": 2.0, "backoff_initial_s": 0.1, "backoff_max_s": 0.5},
    }
    for name, values in (sections or {}).items():
        tables.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    all_arrays: dict[str, Sequence[Mapping[str, object]]] = {"vm": vms, "discover": discover}
    all_arrays.update(arrays or {})
    for name, entries in all_arrays.items():
        for entry in entries:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def lab_config(
    tmp_path: Path,
    vm: LabVM,
    *,
    metrics_port: int | None = None,
    alert: Mapping[str, object] | None = None,
    arrays: Mapping[str, Sequence[Mapping[str, object]]] | None = None,
    file: str = "c.toml",
    **vm_keys: object,
) -> Path:
    """`tmp_path/file`: a config that watches the lab VM `vm` (named as its spec, `vm_keys`
    added) with fast reconnects, state in `tmp_path/state`, `/metrics` on 127.0.0.1:PORT when
    `metrics_port` is given, and `alert` keys and `arrays` ([[alert.exec]], ...) as given."""
    sections: dict[str, Mapping[str, object]] = {"connect": FAST_CONNECT}
    if metrics_port is not None:  # 0: a free port (`DaemonProcess.metrics_port`)
        sections["daemon"] = {"metrics_listen": f"127.0.0.1:{metrics_port}"}
    if alert is not None:
        sections["alert"] = alert
    return write_config(
        tmp_path / file,
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket), **vm_keys}],
        sections=sections,
        arrays=arrays,
    )


def matches(record: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    """Every key of `match` equals the record's value ("a.b" looks into nested objects)."""
    for key, want in match.items():
        value: Any = record
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return False
            value = value[part]
        if value != want:
            return False
    return True


class DaemonProcess:
    """A running `qmpwatch run` and the records it has logged so far."""

    def __init__(self, proc: asyncio.subprocess.Process, config: Path) -> None:
        self.proc = proc
        self.config = config
        self.records: list[Record] = []
        self.bad_lines: list[str] = []
        self.stderr = b""
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        config: Path,
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        started: str = "daemon_started",
        open_files: int | None = None,
        faults: Sequence[str] = (),
    ) -> AsyncIterator[DaemonProcess]:
        """Run the daemon (under the command `prefix`, such as `unshare ...` or `UNPRIVILEGED`,
        when given) until the block ends; it has logged `started` when the block begins.
        `open_files`: the daemon's RLIMIT_NOFILE (soft and hard), as a unit's LimitNOFILE=;
        `faults`: injected by tests/support/faulty_daemon.py."""
        full_env = {**os.environ, **(env or {})}
        module = ["tests.support.faulty_daemon", *faults, "--"] if faults else ["qmpwatch"]
        if faults:  # the suite's own entries (the contract check's) stay behind the checkout
            full_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
            )

        def limit() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", *module, "run", "-c", str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            limit=PIPE_LINE_LIMIT,
            preexec_fn=limit if open_files is not None else None,
        )  # fmt: skip
        daemon = cls(proc, config)
        try:
            await daemon.wait_for(started, timeout=20)
            yield daemon
        finally:
            await daemon.stop()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                self.bad_lines.append(line.decode("utf-8", "replace"))
            else:
                self.records.append(record)
            self._changed.set()
        self._changed.set()

    @property
    def metrics_port(self) -> int:
        """The port the HTTP endpoint bound, from `metrics_listening`: configure
        `metrics_listen = "127.0.0.1:0"` (`ANY_PORT`) and read it here, rather than hand the
        daemon a port that was free a moment ago."""
        listening = self.find("metrics_listening")
        assert listening, "the daemon opened no HTTP endpoint (metrics_listening)"
        port: int = listening[-1]["port"]
        return port

    def mark(self) -> int:
        """How many records exist now; pass as `after` to look only at newer ones."""
        return len(self.records)

    def find(
        self,
        event: str,
        *,
        after: int = 0,
        where: Callable[[Record], bool] | None = None,
        **match: Any,
    ) -> list[Record]:
        return [
            r
            for r in self.records[after:]
            if r.get("event") == event and matches(r, match) and (where is None or where(r))
        ]

    async def wait_for(
        self,
        event: str,
        *,
        timeout: float = 15.0,
        after: int = 0,
        count: int = 1,
        where: Callable[[Record], bool] | None = None,
        **match: Any,
    ) -> Record:
        """Wait until `count` records of kind `event` matching `match` exist; return the last."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    found = self.find(event, after=after, where=where, **match)
                    if len(found) >= count:
                        return found[count - 1]
                    if self._reader.done():
                        await self.proc.wait()
                        if self.proc.stderr is not None and not self.stderr:
                            self.stderr = await self.proc.stderr.read()
                        raise AssertionError(
                            f"daemon exited ({self.proc.returncode}) before {event} {match}; "
                            f"stderr: {self.stderr_text()}"
                        )
                    await self._changed.wait()
        except TimeoutError:
            seen = [
                (r.get("event"), r.get("vm"), r.get("qmp") or r.get("alert"))
                for r in self.records[after:]
            ]
            raise AssertionError(
                f"no {count}x {event} {match} within {timeout} s; records since mark: {seen[-40:]}"
            ) from None

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")[-4000:]

    def send_signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop the daemon with `sig` and wait for it; SIGKILL if it overstays `timeout`."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if self.proc.stderr is not None:
            self.stderr = await self.proc.stderr.read()
        assert self.proc.returncode is not None
        return self.proc.returncode
