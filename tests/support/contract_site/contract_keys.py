"""The contract keys of one qmpwatch record: what the README's contract tables name in it.

Shared by the suite's contract plugin (`tests.support.contract`) and by `sitecustomize.py`
beside this file, which tees the keys of every subprocess daemon's records; standard library
only, since it runs in every Python child of the test run.

A key is (table, name):
    record      the record kind (`event`)
    alert       `alert.alert` (the alert kind)
    resolution  `alert_resolved.alert` (the alert kind that resolved) and its `reason`
    refusal     `listen_peer_refused.reason`
    metric      a series of `/metrics` (from `metric_keys`)
    degraded    a degraded reason of `/healthz` (from `degraded_keys`)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Key = tuple[str, str]
#: Series Prometheus adds beside a histogram's or counter's documented name: suffix -> the
#: suffix to take off and the one to put back (a counter's `_created` beside its `_total`).
SERIES_SUFFIXES = {"_bucket": "", "_count": "", "_sum": "", "_created": "_total"}


def record_keys(record: Mapping[str, Any]) -> Iterator[Key]:
    """The contract keys of one record (a decoded JSON line)."""
    kind = record.get("event")
    if not isinstance(kind, str):
        return
    yield ("record", kind)
    if kind == "alert" and isinstance(record.get("alert"), str):
        yield ("alert", record["alert"])
    elif kind == "alert_resolved":
        if isinstance(record.get("alert"), str):
            yield ("resolution", record["alert"])
        if isinstance(record.get("reason"), str):
            yield ("resolution", record["reason"])
    elif kind == "listen_peer_refused" and isinstance(record.get("reason"), str):
        yield ("refusal", record["reason"])


#: Record kinds whose other fields hold keys too (the rest are keyed by their kind alone).
DETAILED = frozenset({"alert", "alert_resolved", "listen_peer_refused"})
_EVENT = b'"event":"'


def lines_keys(data: bytes) -> Iterator[Key]:
    """The keys of the JSON lines in `data`, cheaply: a record's kind is read from its
    `"event":"..."` (the renderer writes it third, after timestamp and level), and only the
    records in `DETAILED` are decoded (a busy daemon writes thousands of lines a second)."""
    for line in data.splitlines():
        at = line.find(_EVENT)
        if at < 0:
            continue
        start = at + len(_EVENT)
        end = line.find(b'"', start)
        kind = line[start:end].decode("utf-8", "replace")
        if kind not in DETAILED and "\\" not in kind:
            yield ("record", kind)
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield from record_keys(record)


def metric_keys(text: str) -> Iterator[Key]:
    """The qmpwatch series with a sample in one `/metrics` text (process metrics left out)."""
    for line in text.splitlines():
        if line.startswith("qmpwatch_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            yield ("metric", name)


def degraded_keys(reasons: Iterable[str]) -> Iterator[Key]:
    """The keys of the degraded reasons that hold."""
    for reason in reasons:
        yield ("degraded", reason)
