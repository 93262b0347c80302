"""The exec sink: run a command (an argv list, never a shell) for each notification.

The version-1 payload on standard input, the essentials as `QMPWATCH_*` variables, secrets of
the other sinks kept out of its environment; delivered = exit status 0; its process group is
killed when the attempt times out. docs/architecture.md ("Sinks") has the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Collection, Sequence

from qmpwatch.aio.lanes import Lane
from qmpwatch.alerts.outbox import Entry
from qmpwatch.alerts.sinks import DeliveryError, scrub, truncate
from qmpwatch.alerts.sinks.payload import VERSION, encode, payload_v1
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import ExecConfig, Secret
from qmpwatch.core.text import printable

# The variables whose values a guest or a local user can choose (VM names, summaries).
_FROM_PEERS = ("QMPWATCH_KIND", "QMPWATCH_VM", "QMPWATCH_FINGERPRINT", "QMPWATCH_SUMMARY")
STDERR_KEPT = 4096  # bytes: the tail of standard error kept for the log


class ExecSink:
    """One `[[alert.exec]]`."""

    resend_interval_s: float | None = None

    def __init__(
        self,
        index: int,
        config: ExecConfig,
        *,
        host: str,
        ident: str,
        secrets: Sequence[Secret] = (),
    ) -> None:
        self.config = config
        self.host = host
        self.name = f"exec[{index}]"
        self.sink_id = ident
        self.target = config.command[0] if config.command else ""
        self.timeout_s = config.timeout_s
        self._secrets = (*secrets, *config.env.values())
        self._hidden: Collection[str] = frozenset(
            s.source[4:] for s in self._secrets if s.source.startswith("env:")
        )
        self._lane = Lane(f"exec {self.name}")

    @staticmethod
    def identity(config: ExecConfig) -> tuple[str, ...]:
        return ("exec", *config.command)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._lane.stop()  # its thread ends once a command in progress has

    def environment(self, entry: Entry) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in self._hidden}
        env.update((name, secret.reveal()) for name, secret in self.config.env.items())
        alert = entry.alert
        env.update(
            QMPWATCH_PAYLOAD_VERSION=str(VERSION),
            QMPWATCH_IDEMPOTENCY_KEY=entry.key,
            QMPWATCH_STATUS=entry.status,
            QMPWATCH_KIND=alert.kind,
            QMPWATCH_SEVERITY=alert.severity,
            QMPWATCH_VM=alert.vm,
            QMPWATCH_HOST=self.host,
            QMPWATCH_FINGERPRINT=alert.fingerprint,
            QMPWATCH_SUMMARY=alert.summary,
        )
        for key in _FROM_PEERS:  # a NUL would fail the exec; an escape would reach a terminal
            env[key] = printable(env[key])
        return env

    async def deliver(self, entry: Entry) -> None:
        """Run the command in the sink's lane (a thread): starting a program blocks until
        it has been executed, which hangs as long as the file system holding it does (a
        dead NFS server). The dispatcher's timeout cancels the wait; the process group is
        then killed."""
        body = encode(payload_v1(entry, self.host)) + b"\n"
        run = _Run(self.config.command, body, self.environment(entry))
        try:
            status, tail = await asyncio.wrap_future(self._lane.submit(run))
        except OSError as err:
            raise DeliveryError(
                f"cannot run {self.target}: {err.strerror or type(err).__name__}"
            ) from None
        except BaseException:
            run.kill()
            raise
        if status == 0:
            return
        if status < 0:
            try:
                why = f"killed by signal {signal.Signals(-status).name}"
            except ValueError:
                why = f"killed by signal {-status}"
        else:
            why = f"exit status {status}"
        text = tail.decode("utf-8", "replace").strip()
        if text:
            why = f"{why}: {truncate(scrub(text, self._secrets)[-400:], 300)}"
        raise DeliveryError(scrub(why, self._secrets))

    async def refresh(self, alerts: Sequence[Alert], now: float) -> None:
        return None


class _Run:
    """One run of the command, in the sink's lane: (exit status, the end of its stderr)."""

    def __init__(self, argv: Sequence[str], body: bytes, env: dict[str, str]) -> None:
        self.argv = argv
        self.body = body
        self.env = env
        self._lock = threading.Lock()
        self._pid: int | None = None  # while the process runs (not yet reaped)
        self._killed = False

    def __call__(self) -> tuple[int, bytes]:
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        with self._lock:
            self._pid = proc.pid
            killed = self._killed
        if killed:
            self.kill()
        assert proc.stdin is not None
        assert proc.stderr is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(self.body)  # a command may exit without reading it
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.close()
        kept = b""
        while chunk := proc.stderr.read(65536):
            kept = (kept + chunk)[-STDERR_KEPT:]
        proc.stderr.close()
        status = proc.wait()  # never under the lock: kill() runs on the loop
        with self._lock:
            self._pid = None
        return status, kept

    def kill(self) -> None:
        """The attempt is over (timed out, or qmpwatch stops): kill its process group."""
        with self._lock:
            self._killed = True
            if self._pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._pid, signal.SIGKILL)
