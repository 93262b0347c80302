"""The contract check: every kind the README's contract tables document comes out of a daemon
during the test run, and every kind a daemon produced is documented.

A pytest plugin (loaded by tests/conftest.py). It gathers the contract keys
(`contract_site/contract_keys.py`: record kinds, alert kinds, resolutions, listen refusal
reasons, metrics, degraded reasons) of every record, `/metrics` page and `/healthz` degraded
state any qmpwatch produces while the tests run:

- in the test process, while a `Daemon` runs or in a test that started a fake QMP peer:
  `LineWriter._write`, `Metrics.render`, `HttpServer._metrics`, `health.degraded_reasons`
  wrapped from the outside (no hook in qmpwatch; a writer's own unit tests log arbitrary
  kinds, so other in-process records do not count);
- in child processes (`qmpwatch run`, `demo`, `replay`, ...): the same, through
  `contract_site/sitecustomize.py`, put first on $PYTHONPATH; each child appends the keys it
  sees to a file of its own in a directory of this run;
- in the real-systemd namespace: the records of the journal the harness follows
  (`systemd_harness.Journal` calls `observe`).

Each key remembers where it came from: `replay` (`qmpwatch replay`), `fake` (a test that
started a fake QMP peer, `tests.support.fake_qmp`), `real` (a test marked `qemu` or
`libvirt`, or a real-systemd test) or `live` (a real daemon, nothing faked). A documented key
must come from `real` or `live`, unless `tests/contract-allowlist.txt` lists it (with the
reason real QEMU, libvirt or systemd cannot produce it): then a fake or replay will do.

The check judges a whole run only (`make test`: all of tests/, nothing deselected, every
collected test run, no -k/-m/--lf/-x stop); `partial_run` says why a run is not whole, and a
partial run only prints that the check did not judge. On a whole run that breaks the contract
the session fails, one line per key, naming the table.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.contract_site.contract_keys import (
    SERIES_SUFFIXES,
    Key,
    degraded_keys,
    lines_keys,
    metric_keys,
    record_keys,
)

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"
ALLOWLIST = ROOT / "tests" / "contract-allowlist.txt"
SITE = Path(__file__).resolve().parent / "contract_site"
DIR_ENV = "QMPWATCH_CONTRACT_DIR"
TEST_ENV = "QMPWATCH_CONTRACT_TEST"
DUMP_ENV = "QMPWATCH_CONTRACT_DUMP"  # a file: the keys this run produced, and from where
#: "always": judge a partial run too (to see what a subset leaves unproduced; it then fails).
JUDGE_ENV = "QMPWATCH_CONTRACT_JUDGE"
#: Test files whose daemons run under the real systemd (no marker says so).
SYSTEMD_FILES = ("tests/service/test_service.py", "tests/service/test_systemd_service.py")
#: Where each table is in README.md, for the failure message.
TABLES = {
    "record": "README `## The log contract`: the `event` table and the 'Daemon records' / "
    "'Alert delivery records' lists",
    "alert": "README `### Alerts`: the `kind` column",
    "resolution": "README `### Alerts`: an alert kind whose `resolves` column is not '—', or "
    "a reason quoted under 'When a VM leaves'",
    "refusal": "README `## The log contract`: the `listen_peer_refused` row's `reason` list",
    "metric": "README `## Metrics and health`: the 'Series' list",
    "degraded": "README `## Metrics and health`: the `reason` table",
}
GOOD_ORIGINS = frozenset({"real", "live"})


# -- the README's tables ---------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"^#{{1,{len(level)}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end])


def _table_rows(section: str, header: str) -> list[list[str]]:
    """The rows (cells) of the first table in `section` whose header line starts `header`."""
    rows: list[list[str]] = []
    inside = False
    for line in section.splitlines():
        if line.startswith(header):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            if set(line) <= set("|- "):
                continue
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _without_parentheses(text: str) -> str:
    depth, out = 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _paragraph(section: str, start: str) -> str:
    """The paragraph of `section` that begins with `start` (up to its blank line)."""
    begin = section.index(start)
    end = section.find("\n\n", begin)
    return section[begin : end if end >= 0 else len(section)]


@dataclass
class Contract:
    """The documented keys, and for the reverse check the refusal reasons a row allows too."""

    documented: set[Key] = field(default_factory=set)
    also_refusals: set[str] = field(default_factory=set)  # vm_connect_failed's reasons


def documented(readme: str) -> Contract:
    """Every key the README's contract tables document."""
    contract = Contract()
    keys = contract.documented
    log = _section(readme, "## The log contract")
    rows = _table_rows(log, "| `event` |")
    for row in rows:
        (kind,) = _ticked(row[0])
        keys.add(("record", kind))
        if kind == "listen_peer_refused":
            reasons = row[2].split("`reason` (", 1)[1].split(", or a", 1)[0]
            keys.update(("refusal", r) for r in _ticked(reasons))
        if kind == "vm_connect_failed":
            reasons = row[2].split("`reason` (", 1)[1].split(")", 1)[0]
            contract.also_refusals.update(_ticked(reasons))
    lists = _paragraph(log, "Daemon records:")  # and "Alert delivery records:"
    keys.update(("record", k) for k in _ticked(_without_parentheses(lists)))
    alerts = _section(readme, "### Alerts")
    for row in _table_rows(alerts, "| kind |"):
        (kind,) = _ticked(row[0])
        keys.add(("alert", kind))
        if row[3] not in ("—", "-") and "one-shot" not in row[3]:
            keys.add(("resolution", kind))
    leaving = _paragraph(alerts, "**When a VM leaves**")
    for reason in re.findall(r'\("([^"]+)"\)', leaving):
        keys.add(("resolution", " ".join(reason.split())))
    metrics = _section(readme, "## Metrics and health")
    for row in _table_rows(metrics, "| reason |"):
        keys.update(("degraded", k) for k in _ticked(row[0]))
    series = _paragraph(metrics, "Series:")
    names = (s.split("{", 1)[0] for s in _ticked(series))
    keys.update(("metric", n) for n in names if n.startswith("qmpwatch_"))
    return contract


# -- the allow-list -------------------------------------------------------------------------


def allowlist(text: str) -> dict[Key, str]:
    """`tests/contract-allowlist.txt`: lines `TABLE NAME: REASON` ('#' comments)."""
    allowed: dict[Key, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, reason = line.partition(": ")
        table, _, name = head.partition(" ")
        if not sep or not reason.strip() or table not in TABLES or not name.strip():
            raise ValueError(f"{ALLOWLIST.name}:{number}: not 'TABLE NAME: REASON': {raw!r}")
        allowed[(table, name.strip())] = reason.strip()
    return allowed


# -- the judgement --------------------------------------------------------------------------


def _covers(produced: Key, documented: set[Key]) -> bool:
    table, name = produced
    if produced in documented:
        return True
    if table == "metric":
        if ("metric", name + "_total") in documented:
            return True  # a counter's family name (OpenMetrics' `# TYPE` names it so)
        return any(
            name.endswith(suffix)
            and (("metric", name.removesuffix(suffix)) in documented
                 or ("metric", name.removesuffix(suffix) + total) in documented)
            for suffix, total in SERIES_SUFFIXES.items()
        )  # fmt: skip
    return False


def judge(
    contract: Contract, produced: Mapping[Key, Mapping[str, str]], allowed: Mapping[Key, str]
) -> list[str]:
    """One line per broken promise (none when the contract holds).

    `produced`: key -> origin -> the test that produced it first."""
    documented_keys = contract.documented
    produced = _with_base_series(produced)
    problems: list[str] = []
    for key in sorted(documented_keys):
        table, name = key
        origins = produced.get(key, {})
        if not origins:
            problems.append(
                f"documented but produced by no test: {table} `{name}` ({TABLES[table]})"
            )
        elif key not in allowed and not GOOD_ORIGINS & origins.keys():
            where = ", ".join(f"{o} in {t}" for o, t in sorted(origins.items()))
            problems.append(
                f"produced only by a fake or replay ({where}), not allow-listed: {table} "
                f"`{name}` ({TABLES[table]}; list it in {ALLOWLIST.name} with the reason real "
                "QEMU/libvirt/systemd cannot produce it, or produce it for real)"
            )
    for key, origins in sorted(produced.items()):
        table, name = key
        if table == "resolution" or _covers(key, documented_keys):
            continue  # resolution reasons are words with details in them: checked one way
        if table == "refusal" and name in contract.also_refusals:
            continue
        test = next(iter(origins.values()))
        problems.append(
            f"produced but not documented: {table} `{name}` (first by {test}; add it to "
            f"{TABLES[table]})"
        )
    for key in sorted(allowed.keys() - documented_keys):
        problems.append(f"allow-listed but not documented: {key[0]} `{key[1]}` ({ALLOWLIST.name})")
    return problems


def _with_base_series(produced: Mapping[Key, Mapping[str, str]]) -> dict[Key, dict[str, str]]:
    """`produced`, where a histogram's `_bucket` (a counter's `_created`) series also counts
    for the name the README gives (`qmpwatch_event_lag_seconds`, `..._total`)."""
    out = {key: dict(origins) for key, origins in produced.items()}
    for (table, name), origins in produced.items():
        if table != "metric":
            continue
        for suffix, total in SERIES_SUFFIXES.items():
            if name.endswith(suffix):
                for base in {name.removesuffix(suffix), name.removesuffix(suffix) + total}:
                    for origin, test in origins.items():
                        out.setdefault(("metric", base), {}).setdefault(origin, test)
    return out


@dataclass(frozen=True)
class RunShape:
    """What decides whether a run is whole."""

    args: tuple[str, ...]  # the paths pytest was given (or testpaths)
    keyword: str  # -k
    markexpr: str  # -m
    last_failed: bool  # --lf / --sw
    deselected: int
    collected: int
    finished: int  # tests that ran to their teardown
    stopped: bool  # -x / --maxfail / an interrupt ended it early
    collect_only: bool


def partial_run(shape: RunShape, root: Path = ROOT) -> str | None:
    """Why this run is not the whole suite (None: it is, and the check judges it)."""
    whole = {root.resolve(), (root / "tests").resolve()}
    for arg in shape.args:
        if "::" in arg or Path(root, arg).resolve() not in whole:
            return f"only {arg} selected"
    if shape.collect_only:
        return "--collect-only"
    if shape.keyword:
        return f"-k {shape.keyword!r}"
    if shape.markexpr:
        return f"-m {shape.markexpr!r}"
    if shape.last_failed:
        return "--lf/--sw"
    if shape.deselected:
        return f"{shape.deselected} tests deselected"
    if shape.stopped or shape.finished < shape.collected:
        return f"stopped early ({shape.finished} of {shape.collected} tests ran)"
    return None


# -- the collector ---------------------------------------------------------------------------


class Collector:
    """The keys seen so far: key -> origin -> first test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.produced: dict[Key, dict[str, str]] = {}
        self.test = "(outside any test)"
        self.fake_tests: set[str] = set()
        self.real_tests: set[str] = set()
        self.daemons = 0  # in-process daemons running (`Daemon.main`)
        self._raw: list[tuple[Key, str, str]] = []  # key, origin, test: origins settled at end
        self._lock = threading.Lock()

    def note(self, keys: Iterable[Key], origin: str = "live", test: str | None = None) -> None:
        who = self.test if test is None else test
        with self._lock:
            self._raw.extend((k, origin, who) for k in keys)
            if len(self._raw) > 4096:
                self._settle()

    def observe(self, record: Mapping[str, Any]) -> None:
        """A record a harness read from a daemon (the real-systemd journal)."""
        self.note(record_keys(record))

    def _settle(self) -> None:
        for key, given, test in self._raw:
            origin = given
            if given == "live" and test in self.fake_tests:
                origin = "fake"
            elif given == "live" and test in self.real_tests:
                origin = "real"
            self.produced.setdefault(key, {}).setdefault(origin, test)
        self._raw.clear()

    def finish(self) -> dict[Key, dict[str, str]]:
        """All keys, the children's files read in."""
        for path in sorted(self.directory.glob("*.tsv")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) == 4:
                    self.note([(parts[0], json.loads(parts[1]))], parts[2], parts[3])
        with self._lock:
            self._settle()
        return self.produced


_collectors: list[Collector] = []  # this run's (one)


def observe(record: Mapping[str, Any]) -> None:
    """Count a record a harness read from a daemon outside this process's reach."""
    for collector in _collectors:
        collector.observe(record)


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    setattr(owner, name, make(getattr(owner, name)))


def _in_process(collector: Collector) -> None:
    """Wrap qmpwatch's writers in this process, and mark the tests that start fakes."""

    from qmpwatch.output import logs
    from qmpwatch.service import daemon, health, httpserver, metrics
    from tests.support import fake_qmp

    def note_lines(data: bytes) -> None:
        if counted():  # not a writer's own test (arbitrary kinds)
            collector.note(lines_keys(bytes(data)))

    def write(inner: Callable[..., Any]) -> Callable[..., Any]:
        def tee(self: logs.LineWriter, data: bytes | bytearray) -> None:
            # What reaches the stream, on the loop or in the log's lane (a thread).
            note_lines(bytes(data))
            inner(self, data)

        return tee

    def counted() -> bool:
        """Whether what happens now is a daemon's (a metrics unit test's pages are not)."""
        return bool(collector.daemons) or collector.test in collector.fake_tests

    def render(inner: Callable[..., Any]) -> Callable[..., Any]:
        def tee(self: metrics.Metrics) -> bytes:
            text: bytes = inner(self)
            if counted():
                collector.note(metric_keys(text.decode("utf-8", "replace")))
            return text

        return tee

    def reasons(inner: Callable[..., Any]) -> Callable[..., Any]:
        def tee(*args: Any, **kwargs: Any) -> Any:
            found = inner(*args, **kwargs)
            if counted():
                collector.note(degraded_keys(found))
            return found

        return tee

    def fake(inner: Callable[..., Any]) -> Callable[..., Any]:
        def init(*args: Any, **kwargs: Any) -> None:
            collector.fake_tests.add(collector.test)
            inner(*args, **kwargs)

        return init

    def main(inner: Callable[..., Any]) -> Callable[..., Any]:
        async def run(*args: Any, **kwargs: Any) -> Any:
            collector.daemons += 1
            try:
                return await inner(*args, **kwargs)
            finally:
                collector.daemons -= 1

        return run

    def page(inner: Callable[..., Any]) -> Callable[..., Any]:
        async def tee(self: Any, request: Any) -> Any:
            response = await inner(self, request)
            if counted():
                collector.note(metric_keys(bytes(response.body).decode("utf-8", "replace")))
            return response

        return tee

    _wrap(daemon.Daemon, "main", main)
    _wrap(httpserver.HttpServer, "_metrics", page)
    _wrap(logs.LineWriter, "_write", write)
    _wrap(metrics.Metrics, "render", render)
    _wrap(health, "degraded_reasons", reasons)
    _wrap(fake_qmp.FakeQmp, "__init__", fake)
    _wrap(fake_qmp.FakeSession, "__init__", fake)


# -- pytest hooks ----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    directory = Path(tempfile.mkdtemp(prefix="qw-contract-"))
    directory.chmod(0o1777)  # daemons the tests run as other users write here too
    collector = Collector(directory)
    _collectors[:] = [collector]
    config.stash[_KEY] = _State(collector)
    os.environ[DIR_ENV] = str(directory)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(SITE) + (os.pathsep + path if path else "")
    _in_process(collector)


@dataclass
class _State:
    collector: Collector
    deselected: int = 0
    finished: int = 0


_KEY = pytest.StashKey[_State]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    state = item.config.stash[_KEY]
    collector = state.collector
    collector.test = item.nodeid
    if (
        item.get_closest_marker("qemu") is not None
        or item.get_closest_marker("libvirt") is not None
        or item.nodeid.startswith(SYSTEMD_FILES)
    ):
        collector.real_tests.add(item.nodeid)
    os.environ[TEST_ENV] = item.nodeid
    try:
        return (yield)
    finally:
        state.finished += 1
        collector.test = "(between tests)"


def _shape(session: pytest.Session, state: _State) -> RunShape:
    option = session.config.option
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    deselected = len(terminal.stats.get("deselected", [])) if terminal is not None else 0
    return RunShape(
        args=tuple(session.config.args),
        keyword=option.keyword or "",
        markexpr=option.markexpr or "",
        last_failed=bool(getattr(option, "lf", False) or getattr(option, "stepwise", False)),
        deselected=deselected,
        collected=len(session.items),
        finished=state.finished,
        stopped=bool(session.shouldstop or session.shouldfail),
        collect_only=bool(option.collectonly),
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_KEY, None)
    if state is None:
        return
    produced = state.collector.finish()
    shutil.rmtree(state.collector.directory, ignore_errors=True)
    dump = os.environ.get(DUMP_ENV)
    if dump:  # what this run produced, for a person (any run, whole or not)
        Path(dump).write_text("".join(report(produced, produced)), encoding="utf-8")
    reason = partial_run(_shape(session, state))
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write("\n")  # after the progress line
        write: Callable[[str], object] = terminal.write_line
    else:
        write = functools.partial(print, file=sys.stderr)
    if reason is not None and os.environ.get(JUDGE_ENV) != "always":
        write(f"contract check: not judged, not the whole suite ({reason})")
        return
    contract = documented(README.read_text(encoding="utf-8"))
    problems = judge(contract, produced, allowlist(ALLOWLIST.read_text(encoding="utf-8")))
    real = sum(1 for k in contract.documented if "real" in produced.get(k, {}))
    if not problems:
        write(
            f"contract check: all {len(contract.documented)} documented kinds produced "
            f"({real} by real QEMU/libvirt/systemd tests)"
        )
        return
    write(f"contract check FAILED ({len(problems)}):")
    for line in problems:
        write(f"  {line}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def report(produced: Mapping[Key, Mapping[str, str]], keys: Iterable[Key]) -> Iterator[str]:
    """`table name: origin (first test), ...` lines, for a person reading what a run produced."""
    for key in sorted(keys):
        origins = produced.get(key, {})
        found = ", ".join(f"{o} ({t})" for o, t in sorted(origins.items()))
        yield f"{key[0]} {json.dumps(key[1])}: {found or 'nothing'}\n"
