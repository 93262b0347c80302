"""Whether qmpwatch's alerts still get through: the `degraded` state of `/healthz`.

`degraded_reasons` names each kind of trouble that breaks the promise that an alert reaches a
receiver and survives a restart (`state_store_unavailable`, `alert_outbox_unavailable`,
`sink_failing`), and every dependency that is stuck now (`libvirt_unresponsive`,
`journal_blocked`, `state_store_slow`, ...: `qmpwatch.aio.stalls`), with a sentence for
people; `qmpwatch_degraded{reason}` exports them. Pure
apart from reading the state it is given; time is passed in. docs/architecture.md ("Health").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qmpwatch.aio.stalls import STALL_REASONS, STALLS, Stalls
from qmpwatch.alerts.dispatch import AlertDispatcher, SinkFailing
from qmpwatch.service.statestore import StateStore

REASONS = (
    "state_store_unavailable",
    "alert_outbox_unavailable",
    "sink_failing",
    "metrics_unbound",
    *STALL_REASONS,
)


def degraded_reasons(
    *,
    store_problem: str | None,
    outbox_problem: str | None,
    failing: Mapping[str, SinkFailing],
    sink_failing_s: float,
    now: float,
    stalled: Mapping[str, str] | None = None,
    unbound: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Reason -> what is wrong, for every reason in REASONS that holds at `now`; `stalled`:
    the dependencies stuck now (`qmpwatch.aio.stalls`), by reason; `unbound`: the endpoints
    that cannot listen now (`metrics_unbound`)."""
    reasons: dict[str, str] = {**(stalled or {}), **(unbound or {})}
    if store_problem:
        reasons["state_store_unavailable"] = store_problem
    if outbox_problem:
        reasons["alert_outbox_unavailable"] = outbox_problem
    late = [
        f"{name} has failed every attempt for {now - f.since:.0f} s: {f.error}"
        for name, f in sorted(failing.items())
        if now - f.since >= sink_failing_s
    ]
    if late:
        reasons["sink_failing"] = "; ".join(late)
    return reasons


class Degradation(Collector):
    """The daemon's degraded reasons, read from its store and dispatcher when asked.

    Register it in the metrics registry for `qmpwatch_degraded{reason}`; `/healthz` calls
    `reasons()`. `sink_failing_s` is called each time, so a reload's new value applies.
    """

    def __init__(
        self,
        store: StateStore,
        alerts: AlertDispatcher,
        sink_failing_s: Callable[[], float],
        clock: Callable[[], float] = time.time,
        stalls: Stalls = STALLS,
        unbound: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        self._unbound = unbound if unbound is not None else {}
        self._stalls = stalls
        self._alerts = alerts
        self._sink_failing_s = sink_failing_s
        self._clock = clock

    def reasons(self) -> dict[str, str]:
        now = self._clock()
        return degraded_reasons(
            stalled=self._stalls.current(now),
            unbound=self._unbound,
            store_problem=self._store.problem,
            outbox_problem=self._alerts.durability_problem,
            failing=self._alerts.failing,
            sink_failing_s=self._sink_failing_s(),
            now=now,
        )

    def collect(self) -> Iterable[Metric]:
        now = self.reasons()
        family = GaugeMetricFamily(
            "qmpwatch_degraded",
            "1 while alerts are not durable or not getting through, by reason; see /healthz.",
            labels=["reason"],
        )
        for reason in REASONS:
            family.add_metric([reason], 1 if reason in now else 0)
        yield family
