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
from collections.abc import Collection, Sequence

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

    @staticmethod
    def identity(config: ExecConfig) -> tuple[str, ...]:
        return ("exec", *config.command)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

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
        body = encode(payload_v1(entry, self.host)) + b"\n"
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.config.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(entry),
                start_new_session=True,
            )
        except OSError as err:
            raise DeliveryError(
                f"cannot run {self.target}: {err.strerror or type(err).__name__}"
            ) from None
        finished = False
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_feed(proc, body))
                errors = tg.create_task(_tail(proc))
            status = await proc.wait()
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if status == 0:
            return
        if status < 0:
            try:
                why = f"killed by signal {signal.Signals(-status).name}"
            except ValueError:
                why = f"killed by signal {-status}"
        else:
            why = f"exit status {status}"
        tail = errors.result().decode("utf-8", "replace").strip()
        if tail:
            why = f"{why}: {truncate(scrub(tail, self._secrets)[-400:], 300)}"
        raise DeliveryError(why)

    async def refresh(self, alerts: Sequence[Alert], now: float) -> None:
        return None


async def _feed(proc: asyncio.subprocess.Process, body: bytes) -> None:
    """Write the payload to the command's stdin and close it; a command may ignore it.

    A command that exits without reading may have closed the pipe already: uvloop then
    refuses the write (RuntimeError, "the handler is closed") instead of a broken pipe.
    """
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if not proc.stdin.is_closing():
            proc.stdin.write(body)
            await proc.stdin.drain()
    proc.stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await proc.stdin.wait_closed()


async def _tail(proc: asyncio.subprocess.Process) -> bytes:
    """Read stderr to its end, keeping the last STDERR_KEPT bytes."""
    assert proc.stderr is not None
    kept = b""
    while chunk := await proc.stderr.read(65536):
        kept = (kept + chunk)[-STDERR_KEPT:]
    return kept
