"""The alert dispatcher: alerts in, synchronously and at once; deliveries out, per sink.

`fire` and `resolve` queue the notification in the outbox and wake the delivery loops, so the
event intake never waits on a receiver. `run` owns one delivery loop per sink: one attempt at
a time, bounded by the sink's `timeout_s`, with a backoff per entry and per sink; resolved
alerts are re-posted to Alertmanager for `RESOLVED_RETENTION_S`; `failing` tells the health
check which sinks fail. docs/architecture.md ("The dispatcher") has the rules and the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from qmpwatch.alerts.links import NO_LINKS, Links, links_for
from qmpwatch.alerts.outbox import Entry, Outbox, OutboxError, Status
from qmpwatch.alerts.sinks import DeliveryError, Sink, scrub, sink_id, truncate
from qmpwatch.alerts.sinks.alertmanager import AlertmanagerSink
from qmpwatch.alerts.sinks.exec import ExecSink
from qmpwatch.alerts.sinks.webhook import WebhookSink
from qmpwatch.core.alert import RESOLVABLE_KINDS, Alert
from qmpwatch.core.backoff import Backoff
from qmpwatch.core.config import AlertConfig
from qmpwatch.core.times import iso_from_epoch

# The kinds the watch core resolves (it keeps them in `VmWatch.firing`); the others are
# one-shot and never resolved, so they are not kept active for Alertmanager re-posts.
CLOSE_MARGIN_S = 1.0  # beyond aclose's deadline, for the loops to release their sinks
RESOLVED_RETENTION_S = 15 * 60.0  # resolved alerts re-posted this long (as Prometheus does)
# Resolved alerts remembered for re-posting at most; beyond, the oldest resolution is forgotten
# (it was delivered like any other: only its re-posts end early).
RESOLVED_KEPT_MAX = 1000

_log = structlog.get_logger()


@dataclass(slots=True)
class SinkFailing:
    """A sink whose attempts have all failed since `since` (the dispatcher's clock)."""

    since: float
    error: str  # the latest failure


def idempotency_key(host: str, alert: Alert, status: Status, at: float) -> str:
    """Unique per notification and the same for every attempt (32 hex characters)."""
    text = f"{host}\x00{alert.fingerprint}\x00{status}\x00{round(at * 1_000_000)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _same_sink(a: Sink, b: Sink) -> bool:
    """Two sinks that would deliver alike (kind, settings, host, name)."""
    return (
        type(a) is type(b)
        and a.name == b.name
        and getattr(a, "config", None) == getattr(b, "config", None)
        and getattr(a, "host", None) == getattr(b, "host", None)
    )


def build_sinks(
    config: AlertConfig,
    *,
    host: str,
    active: Callable[[], list[Alert]],
    clock: Callable[[], float],
    resolved: Callable[[str, float], list[tuple[Alert, float]]] | None = None,
    links: Links | None = None,
) -> list[Sink]:
    """One sink per configured receiver, each with a stable outbox id."""
    seen: dict[str, int] = {}

    def ident(parts: tuple[str, ...]) -> str:
        base = sink_id(*parts)
        seen[base] = seen.get(base, 0) + 1
        return base if seen[base] == 1 else f"{base}#{seen[base]}"

    secrets = config.secrets()
    sinks: list[Sink] = []
    for i, w in enumerate(config.webhook):
        sinks.append(WebhookSink(i, w, host=host, ident=ident(WebhookSink.identity(w))))
    for i, a in enumerate(config.alertmanager):
        sinks.append(
            AlertmanagerSink(
                i,
                a,
                host=host,
                ident=ident(AlertmanagerSink.identity(a)),
                active=active,
                resolved=resolved or (lambda _sink, _now: []),
                links=links or NO_LINKS,
                clock=clock,
            )
        )
    for i, e in enumerate(config.exec):
        sinks.append(ExecSink(i, e, host=host, ident=ident(ExecSink.identity(e)), secrets=secrets))
    return sinks


class AlertDispatcher:
    """Takes alerts from the watch core and delivers them to every configured sink.

    `host` names this machine in payloads and Alertmanager labels; empty: `alert.host`
    from the config, else the hostname. `state_dir` holds the outbox; if it is unusable
    (or None) the outbox lives in memory only, `problem` says why, and an
    `alert_outbox_unavailable` record is logged.
    """

    def __init__(
        self,
        config: AlertConfig,
        state_dir: Path | None,
        *,
        host: str,
        clock: Callable[[], float] = time.time,
        on_result: Callable[[str, str, str], None] | None = None,
        links: Links | None = None,
    ) -> None:
        """`on_result(kind, sink_name, "delivered" | "failed")` is told every attempt;
        `links` go out with Alertmanager alerts (default: from `config` alone)."""
        self.config = config
        self._on_result = on_result
        self.host = host or config.host or socket.gethostname()
        self._clock = clock
        self._secrets = config.secrets()
        self._backoff = Backoff(config.retry_initial_s, config.retry_max_s)
        self._outbox: Outbox | None = None
        self._resolved: dict[str, tuple[Alert, float]] = {}  # fingerprint -> (alert, when)
        self.sinks = build_sinks(
            config,
            host=self.host,
            active=self._active,
            resolved=self.recently_resolved,
            clock=clock,
            links=links or links_for(config, ""),
        )
        sink_ids = [s.sink_id for s in self.sinks]
        self.problem: str | None = None  # why the outbox is not durable, if it is not
        try:
            self._outbox = Outbox(state_dir, sinks=sink_ids, max_entries=config.outbox_max_entries)
        except OutboxError as err:
            # Alerts that survive no restart beat no alerts: deliver from memory, say so.
            self.problem = str(err)
            _log.error("alert_outbox_unavailable", error=self.problem, durable=False)
            self._outbox = Outbox(None, sinks=sink_ids, max_entries=config.outbox_max_entries)
        self._wake = {s.sink_id: asyncio.Event() for s in self.sinks}
        self._closing = asyncio.Event()
        self._deadline: float | None = None  # loop time, once closing
        self._inflight: dict[str, asyncio.Timeout] = {}
        self._running = False
        self._tg: asyncio.TaskGroup | None = None  # run()'s, for sinks added by a reload
        self._stopped = asyncio.Event()
        self.failing: dict[str, SinkFailing] = {}  # sink name -> since when it fails
        # By sink id (a retiring sink may share its name with the one that replaced it):
        self.last_success: dict[str, float] = {}  # its latest success
        self.last_error: dict[str, str] = {}  # its latest failure
        self._failing_ids: set[str] = set()  # its latest attempt failed
        # Sinks a reload removed or replaced by another receiver, still delivering the
        # resolutions of alerts they received (by sink id; `Outbox.retains`).
        self.retiring: dict[str, Sink] = {}

    @property
    def durability_problem(self) -> str | None:
        """Why notifications are not (all) durable now: an in-memory outbox, or its last
        commit failed; None while they are."""
        return self.problem or self.outbox.problem

    def _active(self) -> list[Alert]:
        return [] if self._outbox is None else self._outbox.active()

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None
        return self._outbox

    # -- intake (synchronous, never waits on a sink) ----------------------------------------

    def fire(self, alert: Alert) -> None:
        """Queue a new alert for every sink."""
        self._resolved.pop(alert.fingerprint, None)
        active = True if alert.kind in RESOLVABLE_KINDS else None
        self._queue(alert, "firing", alert.raised_at, active)

    def resolve(self, alert: Alert, now: float) -> None:
        """Queue the resolution of `alert` (ended at `now`) for every sink."""
        resolved = self._resolved
        resolved.pop(alert.fingerprint, None)
        resolved[alert.fingerprint] = (alert, now)
        if len(resolved) > RESOLVED_KEPT_MAX:
            del resolved[next(iter(resolved))]
        self._queue(alert, "resolved", now, False)

    def _queue(self, alert: Alert, status: Status, at: float, active: bool | None) -> None:
        if self.outbox.closed:
            _log.warning(
                "alert_not_queued",
                vm=alert.vm,
                alert=alert.kind,
                status=status,
                fingerprint=alert.fingerprint,
                reason="dispatcher_closed",
            )
            return
        key = idempotency_key(self.host, alert, status, at)
        if self.outbox.add(alert, status, at, key, active=active) is not None:
            for wake in self._wake.values():
                wake.set()

    # -- looking -----------------------------------------------------------------------------

    def depth(self) -> int:
        """Entries not yet delivered to every sink (for metrics)."""
        return self.outbox.depth()

    def owed_by_sink(self) -> dict[str, int]:
        """Entries each sink still has to get, by sink name (`webhook[0]`, ...)."""
        return {s.name: self.outbox.owed_to(s.sink_id) for s in self.sinks}

    def sink_report(self) -> list[dict[str, Any]]:
        """How each sink fares, for `qmpwatch status`: `sink` (its name and host), `ok`
        (its latest attempt worked, or none failed yet), `pending` (notifications it is
        owed), `last_error`, `last_success` (ISO 8601; null: none yet)."""
        report = []
        retiring = list(self.retiring.values())
        for sink in [*self.sinks, *self.retiring.values()]:
            success = self.last_success.get(sink.sink_id)
            report.append(
                {
                    "sink": sink_label(sink) + (" (removed)" if sink in retiring else ""),
                    "ok": sink.sink_id not in self._failing_ids,
                    "pending": self.outbox.owed_to(sink.sink_id),
                    "last_error": self.last_error.get(sink.sink_id),
                    "last_success": None if success is None else iso_from_epoch(success),
                }
            )
        return report

    def recently_resolved(self, sink_id: str, now: float) -> list[tuple[Alert, float]]:
        """(alert, resolved at) of the alerts resolved within RESOLVED_RETENTION_S before
        `now` whose notifications `sink_id` already has (an owed one is delivered in order
        instead), oldest first. Forgets those resolved longer ago."""
        resolved = self._resolved
        while resolved:
            fingerprint, (_, at) = next(iter(resolved.items()))
            if now - at <= RESOLVED_RETENTION_S:
                break
            del resolved[fingerprint]
        if not resolved:
            return []
        owed = self.outbox.owed_fingerprints(sink_id)
        return [(a, at) for fp, (a, at) in resolved.items() if fp not in owed]

    def firing_alerts(self) -> list[Alert]:
        """Alerts fired (resolvable kinds) and not yet resolved, also from before a restart."""
        return self.outbox.active()

    # -- delivery ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until `aclose` has finished (then return) or until cancelled."""
        if self._closing.is_set() or self.outbox.closed:
            return
        self._running = True
        self._stopped.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for sink in self.sinks:
                    tg.create_task(self._serve(sink), name=f"qmpwatch-alert-{sink.name}")
                await self._closing.wait()  # sinks added by a reload need the group until then
        finally:
            self._tg = None
            self._running = False
            self._stopped.set()

    async def aclose(self, deadline_s: float) -> None:
        """Deliver what is due within `deadline_s` seconds, then stop and close the outbox."""
        if self.outbox.closed:
            return
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + max(deadline_s, 0.0)
        self._closing.set()
        for wake in self._wake.values():
            wake.set()
        for cm in self._inflight.values():
            when = cm.when()
            if when is None or when > deadline:
                cm.reschedule(deadline)
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline + CLOSE_MARGIN_S):
                    await self._stopped.wait()
        left = self.outbox.depth()
        (_log.warning if left else _log.info)(
            "alert_dispatcher_stopped", undelivered=left, by_sink=self.owed_by_sink()
        )
        self.outbox.close()

    def reconfigure(self, config: AlertConfig, links: Links | None = None) -> list[str]:
        """A reload's `[alert]`: the host, the retry delays and the sinks change now. A sink
        whose settings did not change keeps its connection and its delivery in flight; a
        changed one takes over from the old one after that one's attempt in flight; a new
        sink is owed the notifications from now on; a removed one is owed nothing more.
        Returns what changed, as config keys."""
        old = self.config
        changed = [
            f"alert.{name}"
            for name in ("host", "retry_initial_s", "retry_max_s", "outbox_max_entries")
            if getattr(old, name) != getattr(config, name)
        ]
        self.config = config
        self.host = config.host or socket.gethostname()
        self._secrets = config.secrets()
        self._backoff = Backoff(config.retry_initial_s, config.retry_max_s)
        self.outbox.max_entries = config.outbox_max_entries
        built = build_sinks(
            config,
            host=self.host,
            active=self._active,
            resolved=self.recently_resolved,
            clock=self._clock,
            links=links or links_for(config, ""),
        )
        current = {sink.sink_id: sink for sink in self.sinks}
        sinks: list[Sink] = []
        for sink in built:
            before = current.get(sink.sink_id)
            if before is not None and _same_sink(before, sink):
                sinks.append(before)
                continue
            sinks.append(sink)
            changed.append(sink_label(sink))
        kept = {id(sink) for sink in sinks}
        new_ids = {n.sink_id for n in sinks}
        changed += [sink_label(s) + " (removed)" for s in self.sinks if s.sink_id not in new_ids]
        self.outbox.set_sinks(s.sink_id for s in sinks)
        for sink in self.sinks:
            if id(sink) in kept:
                continue
            if sink.sink_id not in new_ids and self.outbox.retains(sink.sink_id):
                self.retiring[sink.sink_id] = sink  # still owes resolutions; then it ends
            self._wake[sink.sink_id].set()  # its loop sees it is retired, and ends
        for ident in new_ids:
            self.retiring.pop(ident, None)  # back in the configuration: the new one serves
        self.sinks = sinks
        for sink in sinks:
            if sink.sink_id not in self._wake:
                self._wake[sink.sink_id] = asyncio.Event()
            if id(sink) not in {id(s) for s in current.values()} and self._tg is not None:
                self._tg.create_task(self._serve(sink), name=f"qmpwatch-alert-{sink.name}")
        return changed

    def _retired(self, sink: Sink) -> bool:
        """Whether a reload replaced or removed `sink` and it owes nothing more."""
        if any(s is sink for s in self.sinks):
            return False
        if self.retiring.get(sink.sink_id) is sink and self.outbox.retains(sink.sink_id):
            return False
        if self.retiring.get(sink.sink_id) is sink:
            del self.retiring[sink.sink_id]
        return True

    async def _serve(self, sink: Sink) -> None:
        await sink.start()
        try:
            await self._loop(sink)
        finally:
            await sink.stop()

    async def _loop(self, sink: Sink) -> None:
        wake = self._wake[sink.sink_id]
        failures = 0  # consecutive, of this sink
        next_refresh = self._clock() if sink.resend_interval_s is not None else None
        while True:
            wake.clear()
            if self._retired(sink):
                return
            now = self._clock()
            closing = self._closing.is_set()
            entry, due = self.outbox.next_for(sink.sink_id, now)
            if entry is None and closing:
                return
            if next_refresh is not None and sink.sink_id in self.retiring:
                next_refresh = None  # a removed Alertmanager gets its resolutions, no re-posts
            if entry is None and next_refresh is not None and next_refresh <= now:
                assert sink.resend_interval_s is not None
                if await self._refresh(sink, failures):
                    failures = 0
                    next_refresh = self._clock() + sink.resend_interval_s
                    continue
                failures += 1
                pause = self._backoff.delay(failures)
                next_refresh = self._clock() + pause
                await self._nap(pause)
                continue
            if entry is None:
                wait_until = min((t for t in (due, next_refresh) if t is not None), default=None)
                await self._sleep(wake, None if wait_until is None else wait_until - now)
                continue
            backoff = await self._attempt(sink, entry, failures)
            if backoff is None:
                failures = 0
                continue
            if closing:
                return
            failures += 1
            await self._nap(backoff)

    async def _attempt(self, sink: Sink, entry: Entry, failures: int) -> float | None:
        """One delivery attempt; None when delivered, else how long the sink should pause."""
        attempt = self.outbox.attempts(sink.sink_id, entry.seq) + 1
        try:
            async with self._timeout(sink) as cm:
                await sink.deliver(entry)
        except TimeoutError:
            error = self._timeout_error(sink, cm)
        except DeliveryError as err:
            error = str(err)
        except Exception as err:  # a bug or an unforeseen library error: retry, do not die
            error = truncate(scrub(f"{type(err).__name__}: {err}", self._secrets))
        else:
            self._note_success(sink)
            self.outbox.delivered(sink.sink_id, entry.seq)
            alert = entry.alert
            if self._on_result is not None:
                self._on_result(alert.kind, sink.name, "delivered")
            _log.info(
                "alert_delivered",
                **_attempt_fields(sink, entry, attempt),
                latency_ms=round((self._clock() - entry.at) * 1000, 1),
            )
            return None
        finally:
            self._inflight.pop(sink.sink_id, None)
        pause = self._backoff.delay(failures + 1)
        retry_in = max(self._backoff.delay(attempt), pause)
        self.outbox.failed(sink.sink_id, entry.seq, self._clock() + retry_in)
        self._note_failure(sink, error)
        alert = entry.alert
        if self._on_result is not None:
            self._on_result(alert.kind, sink.name, "failed")
        _log.warning(
            "alert_delivery_failed",
            **_attempt_fields(sink, entry, attempt),
            error=error,
            retry_in_s=round(retry_in, 3),
        )
        return pause

    async def _refresh(self, sink: Sink, failures: int) -> bool:
        """Re-post the active (and recently resolved) alerts to `sink` (Alertmanager); False
        on failure (logged)."""
        alerts = self.outbox.active()
        if not alerts and not self.recently_resolved(sink.sink_id, self._clock()):
            return True  # nothing to post: no news about the sink either
        try:
            async with self._timeout(sink) as cm:
                await sink.refresh(alerts, self._clock())
        except TimeoutError:
            error = self._timeout_error(sink, cm)
        except DeliveryError as err:
            error = str(err)
        except Exception as err:
            error = truncate(scrub(f"{type(err).__name__}: {err}", self._secrets))
        else:
            self._note_success(sink)
            return True
        finally:
            self._inflight.pop(sink.sink_id, None)
        self._note_failure(sink, error)
        _log.warning(
            "alert_refresh_failed",
            sink=sink.name,
            target=sink.target,
            alerts=len(alerts),
            error=error,
            retry_in_s=round(self._backoff.delay(failures + 1), 3),
        )
        return False

    def _note_success(self, sink: Sink) -> None:
        self.failing.pop(sink.name, None)
        self.last_success[sink.sink_id] = self._clock()
        self._failing_ids.discard(sink.sink_id)

    def _note_failure(self, sink: Sink, error: str) -> None:
        self.last_error[sink.sink_id] = error
        self._failing_ids.add(sink.sink_id)
        failing = self.failing.get(sink.name)
        if failing is None:
            self.failing[sink.name] = SinkFailing(self._clock(), error)
        else:
            failing.error = error

    def _timeout(self, sink: Sink) -> asyncio.Timeout:
        when = asyncio.get_running_loop().time() + sink.timeout_s
        if self._deadline is not None:
            when = min(when, self._deadline)
        cm = asyncio.timeout_at(when)
        self._inflight[sink.sink_id] = cm
        return cm

    def _timeout_error(self, sink: Sink, cm: asyncio.Timeout) -> str:
        if self._deadline is not None and cm.when() == self._deadline:
            return "stopped: the daemon is shutting down"
        return f"timed out after {sink.timeout_s:g} s"

    async def _sleep(self, wake: asyncio.Event, seconds: float | None) -> None:
        """Until `wake` is set (new entries, closing) or `seconds` have passed."""
        if seconds is not None and seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()

    async def _nap(self, seconds: float) -> None:
        """A pause after a failure: only closing cuts it short."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()


def sink_label(sink: Sink) -> str:
    """A sink as people name it: `webhook[0] (alerts.example:443)`: its index and the host
    (and port) of its URL, or the program of an exec sink; never a URL path or a secret."""
    target = sink.target  # already redacted: scheme://host[:port]
    host = urlsplit(target).netloc if "://" in target else target
    return f"{sink.name} ({host})" if host else sink.name


def _attempt_fields(sink: Sink, entry: Entry, attempt: int) -> dict[str, Any]:
    """The keys every delivery-attempt record carries."""
    alert = entry.alert
    return {
        "vm": alert.vm,
        "alert": alert.kind,
        "status": entry.status,
        "fingerprint": alert.fingerprint,
        "sink": sink.name,
        "target": sink.target,
        "attempt": attempt,
    }
