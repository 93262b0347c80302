"""Configuration: design.md's keys, errors that name the key, secrets, and `check-config`."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpwatch.core.config import (
    Config,
    ConnectConfig,
    DaemonConfig,
    FollowupConfig,
    Secret,
    load_config,
    parse_config,
    parse_config_text,
)
from qmpwatch.core.errors import ConfigError

TOKEN = "s3cr3t-T0KEN-value"

# design.md's "Configuration (TOML)" section, verbatim.
DESIGN_EXAMPLE = """
[daemon]
log_format = "json"                 # "json" | "console"
log_file = ""                       # empty: stdout
state_dir = "/var/lib/qmpwatch"     # SQLite state + alert outbox live here
metrics_listen = "127.0.0.1:9752"   # empty: no HTTP endpoint (/metrics, /healthz)

[connect]
timeout_s = 5.0                     # socket connect + greeting + negotiation
backoff_initial_s = 0.5
backoff_max_s = 30.0

[followup]                          # deadlines in seconds
stop_after_block_io_error_s = 5.0
stop_after_shutdown_s = 5.0
reset_after_watchdog_s = 5.0
stop_after_watchdog_s = 5.0
shutdown_after_watchdog_s = 120.0

[[vm]]
name = "web01"
socket = "/run/qemu/web01.qmp"
no_shutdown = "auto"                # true | false | "auto"

[[discover]]
glob = "/run/qemu/*.qmp"            # VM name = file name without extension

[[alert.webhook]]
url = "https://alerts.example/qmp"
headers = { Authorization = "env:QMPWATCH_WEBHOOK_TOKEN" }

[[alert.alertmanager]]
url = "http://127.0.0.1:9093"

[[alert.exec]]
command = ["/usr/local/bin/page-oncall"]   # alert JSON on stdin; never through a shell
"""


def problems_of(text: str) -> list[str]:
    """The problems parse_config_text reports for `text` (it must report some)."""
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# ---------------------------------------------------------------------------------------------
# Good configurations


def test_design_example_parses_with_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of design.md's example is read into the Config it describes."""
    monkeypatch.setenv("QMPWATCH_WEBHOOK_TOKEN", TOKEN)
    cfg = parse_config_text(DESIGN_EXAMPLE)
    assert cfg.daemon == DaemonConfig("json", "", "/var/lib/qmpwatch", "127.0.0.1:9752")
    assert cfg.connect == ConnectConfig(timeout_s=5.0, backoff_initial_s=0.5, backoff_max_s=30.0)
    assert cfg.followup.stop_after_block_io_error_s == 5.0
    assert cfg.followup.stop_after_shutdown_s == 5.0
    assert cfg.followup.reset_after_watchdog_s == 5.0
    assert cfg.followup.stop_after_watchdog_s == 5.0
    assert cfg.followup.shutdown_after_watchdog_s == 120.0
    (vm,) = cfg.vms
    assert (vm.name, vm.socket, vm.no_shutdown) == ("web01", "/run/qemu/web01.qmp", "auto")
    (discover,) = cfg.discover
    assert discover.glob == "/run/qemu/*.qmp"
    (webhook,) = cfg.alert.webhook
    assert webhook.url == "https://alerts.example/qmp"
    assert list(webhook.headers) == ["Authorization"]
    assert webhook.headers["Authorization"].reveal() == TOKEN
    (manager,) = cfg.alert.alertmanager
    assert manager.url == "http://127.0.0.1:9093"
    (exec_,) = cfg.alert.exec
    assert exec_.command == ("/usr/local/bin/page-oncall",)


def test_empty_file_is_the_defaults() -> None:
    """An empty file is valid and gives design.md's defaults, with no VM and no sink."""
    cfg = parse_config_text("")
    assert cfg == Config()
    assert cfg.daemon.log_format == "json"
    assert cfg.connect.timeout_s == 5.0
    assert cfg.followup == FollowupConfig()
    assert cfg.followup.shutdown_after_watchdog_s == 120.0
    assert cfg.alert.client_stop_severity == "warning"


def test_values_other_than_the_defaults_are_read() -> None:
    """Non-default values land where they belong (integers accepted as seconds)."""
    cfg = parse_config_text(
        """
        [daemon]
        log_format = "console"
        log_file = "/var/log/qmpwatch.log"
        metrics_listen = ""
        [connect]
        timeout_s = 2
        [followup]
        stop_after_block_io_error_s = 0.25
        exit_after_watchdog_s = 9
        [alert]
        client_stop_severity = "none"
        [[vm]]
        name = "db01"
        socket = "/run/qemu/db01.qmp"
        no_shutdown = true
        [[vm]]
        name = "db02"
        socket = "/run/qemu/db02.qmp"
        no_shutdown = false
        """
    )
    assert cfg.daemon.log_format == "console"
    assert cfg.daemon.log_file == "/var/log/qmpwatch.log"
    assert cfg.daemon.metrics_listen == ""
    assert cfg.connect.timeout_s == 2.0
    assert cfg.followup.stop_after_block_io_error_s == 0.25
    assert cfg.followup.exit_after_watchdog_s == 9.0
    assert cfg.alert.client_stop_severity == "none"
    assert [(v.name, v.no_shutdown) for v in cfg.vms] == [("db01", True), ("db02", False)]


# ---------------------------------------------------------------------------------------------
# Errors name the key and say what is wrong


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(
            '[connect]\ntimeout_s = "soon"',
            'connect.timeout_s: expected a number, got "soon"',
            id="number-as-string",
        ),
        pytest.param(
            "[connect]\ntimeout_s = true",
            "connect.timeout_s: expected a number, got true",
            id="number-as-bool",
        ),
        pytest.param(
            "[connect]\ntimeout_s = 0",
            "connect.timeout_s: must be a number greater than 0, got 0",
            id="zero",
        ),
        pytest.param(
            "[followup]\nstop_after_shutdown_s = -1.5",
            "followup.stop_after_shutdown_s: must be a number greater than 0, got -1.5",
            id="negative",
        ),
        pytest.param(
            "[followup]\nreset_after_watchdog_s = nan",
            "followup.reset_after_watchdog_s: must be a number greater than 0, got nan",
            id="nan",
        ),
        pytest.param(
            "[connect]\nbackoff_max_s = inf",
            "connect.backoff_max_s: must be a number greater than 0, got inf",
            id="inf",
        ),
        pytest.param(
            "[connect]\ntimeout_s = 1" + "0" * 400,
            "connect.timeout_s: number too large",
            id="huge-integer",
        ),
        pytest.param(
            "[followup]\nstop_after_block_io_eror_s = 5.0",
            "followup.stop_after_block_io_eror_s: unknown key "
            "(did you mean stop_after_block_io_error_s?)",
            id="typo-in-deadline",
        ),
        pytest.param(
            "[conect]\ntimeout_s = 5.0",
            "conect: unknown key (did you mean connect?)",
            id="typo-in-section",
        ),
        pytest.param("timeout_s = 5.0", "timeout_s: unknown key", id="key-outside-section"),
        pytest.param(
            '[daemon]\nlog_format = "xml"',
            'daemon.log_format: expected one of "json", "console", got "xml"',
            id="choice",
        ),
        pytest.param(
            '[daemon]\nstate_dir = ""', "daemon.state_dir: must not be empty", id="empty-state-dir"
        ),
        pytest.param(
            '[daemon]\nmetrics_listen = "9752"',
            'daemon.metrics_listen: expected "HOST:PORT" or "", got "9752"',
            id="listen-without-host",
        ),
        pytest.param(
            '[daemon]\nmetrics_listen = "127.0.0.1:70000"',
            'daemon.metrics_listen: expected "HOST:PORT" or "", got "127.0.0.1:70000"',
            id="listen-port-too-big",
        ),
        pytest.param(
            '[daemon]\nmetrics_listen = "127.0.0.1:\u00b2"',
            "daemon.metrics_listen: expected",
            id="listen-port-superscript-digit",
        ),
        pytest.param(
            "[connect]\nbackoff_initial_s = 10.0\nbackoff_max_s = 1.0",
            "connect.backoff_max_s: must not be less than backoff_initial_s (10)",
            id="backoff-order",
        ),
        pytest.param("daemon = 5", "daemon: expected a table, got 5", id="section-not-table"),
        pytest.param(
            'vm = "web01"',
            'vm: expected an array of tables ([[vm]]), got "web01"',
            id="vm-not-array",
        ),
        pytest.param(
            '[[vm]]\nname = "web01"', "vm[0] web01: socket: missing (required)", id="no-socket"
        ),
        pytest.param(
            '[[vm]]\nsocket = "/run/a.qmp"', "vm[0]: name: missing (required)", id="no-name"
        ),
        pytest.param(
            '[[vm]]\nname = "a"\nsocket = "/a"\nno_shutdown = "yes"',
            'vm[0] a: no_shutdown: expected true, false or "auto", got "yes"',
            id="no-shutdown-word",
        ),
        pytest.param(
            '[[vm]]\nname = "a"\nsocket = "/a"\n[[vm]]\nname = "a"\nsocket = "/b"',
            'vm[1] a: name: duplicate VM name "a" (also vm[0] a)',
            id="duplicate-vm",
        ),
        pytest.param(
            '[[vm]]\nname = "a"\nsocket = "/a"\nsockett = "/b"',
            "vm[0] a: sockett: unknown key (did you mean socket?)",
            id="typo-in-vm",
        ),
        pytest.param(
            '[[vm]]\nname = "web02"\nsocket = "run/web02.qmp"',
            'vm[0] web02: socket: must be an absolute path, got "run/web02.qmp"',
            id="relative-socket",
        ),
        pytest.param(
            '[[discover]]\nglob = "*.qmp"',
            'discover[0].glob: must be an absolute path, got "*.qmp"',
            id="relative-glob",
        ),
        pytest.param("[[discover]]\n", "discover[0].glob: missing (required)", id="no-glob"),
        pytest.param(
            '[alert]\nclient_stop_severity = "page"',
            'alert.client_stop_severity: expected one of "critical", "warning", "info", "none", '
            'got "page"',
            id="client-stop-severity",
        ),
        pytest.param(
            '[[alert.webhook]]\nurl = "ftp://alerts.example"',
            'alert.webhook[0].url: expected an http:// or https:// URL, got "ftp://alerts.example"',
            id="webhook-scheme",
        ),
        pytest.param(
            '[[alert.webhook]]\nurl = "http://a"\nheaders = { X-Token = 5 }',
            "alert.webhook[0].headers.X-Token: expected a string, got 5",
            id="header-not-string",
        ),
        pytest.param("[[alert.alertmanager]]\n", "alert.alertmanager[0].url: missing (required)"),
        pytest.param(
            '[[alert.exec]]\ncommand = "/usr/local/bin/page-oncall --now"',
            "alert.exec[0].command: expected a non-empty array of strings (argv), "
            'got "/usr/local/bin/page-oncall --now"',
            id="exec-command-string",
        ),
        pytest.param(
            "[[libvirt]]\nunresponsive_alert_s = 0",
            "libvirt[0].unresponsive_alert_s: must be a number greater than 0, got 0",
            id="libvirt-unresponsive-alert",
        ),
        pytest.param(
            "[daemon]\nlog_backlog_bytes = 10",
            "daemon.log_backlog_bytes: must be a number greater than 4095, got 10",
            id="log-backlog",
        ),
        pytest.param(
            "[[alert.exec]]\ncommand = []",
            "alert.exec[0].command: expected a non-empty array of strings (argv), got an array",
            id="exec-command-empty",
        ),
    ],
)
def test_problem_names_the_key_and_what_is_wrong(text: str, problem: str) -> None:
    """Each bad value is one problem line: the key's full path, then what is wrong."""
    found = problems_of(text)
    assert any(line.startswith(problem) for line in found), found


def test_several_problems_are_reported_at_once() -> None:
    """Every problem of a file is reported in one go, in file order, not just the first."""
    found = problems_of(
        """
        [connect]
        timeout_s = "soon"
        [followup]
        stop_after_shutdown_s = 0
        stop_after_watchdogs_s = 5.0
        [[vm]]
        name = "web01"
        """
    )
    assert found == [
        'connect.timeout_s: expected a number, got "soon"',
        "followup.stop_after_shutdown_s: must be a number greater than 0, got 0",
        "followup.stop_after_watchdogs_s: unknown key (did you mean stop_after_watchdog_s?)",
        "vm[0] web01: socket: missing (required)",
    ]


def test_two_unnamed_vms_are_not_called_duplicates() -> None:
    """Two [[vm]] without a name are two missing names, not a duplicate name "" as well."""
    found = problems_of("[[vm]]\nsocket = '/a'\n[[vm]]\nsocket = '/b'")
    assert found == ["vm[0]: name: missing (required)", "vm[1]: name: missing (required)"]


def test_toml_syntax_error_names_the_file_and_position(tmp_path: Path) -> None:
    """A file that is not TOML is one problem naming the file, with line and column."""
    path = tmp_path / "config.toml"
    path.write_text("[connect]\ntimeout_s = = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: not valid TOML:")
    assert "line 2" in problem


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file or one that is not UTF-8 is a ConfigError that says so."""
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        load_config(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[connect]")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)


TOML_VALUE = st.recursive(
    st.none().map(lambda _: "")
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.datetimes(timezones=st.just(UTC)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
SECTION_KEYS: dict[str, list[str]] = {
    "daemon": ["log_format", "log_file", "log_target", "state_dir", "metrics_listen"],
    "connect": ["timeout_s", "backoff_initial_s", "backoff_max_s"],
    "followup": list(FollowupConfig.__slots__),
    "vm": ["name", "socket", "no_shutdown"],
    "discover": ["glob", "no_shutdown"],
    "alert": ["client_stop_severity", "webhook", "alertmanager", "exec"],
    "sink": ["url", "headers", "hmac_secret", "timeout_s", "command"],
}


def _table(section: str) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from([*SECTION_KEYS[section], "typo"])
    return st.dictionaries(keys, TOML_VALUE | st.sampled_from(["auto", "json", "h:1", "env:X"]))


CONFIG_TABLES = st.fixed_dictionaries(
    {},
    optional={
        "daemon": _table("daemon") | TOML_VALUE,
        "connect": _table("connect"),
        "followup": _table("followup"),
        "vm": st.lists(_table("vm"), max_size=3) | TOML_VALUE,
        "discover": st.lists(_table("discover"), max_size=2),
        "alert": st.fixed_dictionaries(
            {},
            optional={
                "client_stop_severity": TOML_VALUE,
                "webhook": st.lists(_table("sink"), max_size=2) | TOML_VALUE,
                "alertmanager": st.lists(_table("sink"), max_size=2),
                "exec": st.lists(_table("sink"), max_size=2),
            },
        ),
    },
)


@given(CONFIG_TABLES)
def test_any_parsed_toml_gives_a_config_or_a_config_error(table: dict[str, Any]) -> None:
    """Whatever values sit under the known keys, parsing ends in a ConfigError saying what is
    wrong, or a Config that refused no unknown key and dropped no configured VM or sink."""
    result: Config | ConfigError
    try:
        result = parse_config(table)
    except ConfigError as err:
        result = err
    if isinstance(result, ConfigError):
        assert result.problems
        assert all(": " in problem for problem in result.problems)
        return
    # Accepted: nothing unknown was let through and nothing configured was dropped.
    assert "typo" not in _keys(table)
    vms = table.get("vm", [])
    assert len(result.vms) == (len(vms) if isinstance(vms, list) else 0)
    alert = table.get("alert", {})
    for kind in ("webhook", "alertmanager", "exec"):
        sinks = alert.get(kind, [])
        assert len(getattr(result.alert, kind)) == (len(sinks) if isinstance(sinks, list) else 0)


def _keys(table: dict[str, Any]) -> list[str]:
    """The keys of every [section], [[array]] entry and sink table of a parsed config (not of
    the values inside them, such as a sink's `headers`)."""
    tables: list[Any] = [table.get(name) for name in ("daemon", "connect", "followup", "alert")]
    tables += [e for name in ("vm", "discover") if isinstance(table.get(name), list)
               for e in table[name]]  # fmt: skip
    alert = table.get("alert", {})
    tables += [e for kind in ("webhook", "alertmanager", "exec")
               if isinstance(alert.get(kind), list) for e in alert[kind]]  # fmt: skip
    return [key for t in tables if isinstance(t, dict) for key in t]


# ---------------------------------------------------------------------------------------------
# Secrets


def test_env_secret_resolves_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """env:NAME reads the variable; repr/str of the secret and of the Config never show it."""
    monkeypatch.setenv("QMPWATCH_WEBHOOK_TOKEN", TOKEN)
    cfg = parse_config_text(DESIGN_EXAMPLE)
    secret = cfg.alert.webhook[0].headers["Authorization"]
    assert secret.reveal() == TOKEN
    assert repr(secret) == "Secret(env:QMPWATCH_WEBHOOK_TOKEN)"
    for shown in (repr(secret), str(secret), f"{secret}", repr(cfg), str(cfg.alert)):
        assert TOKEN not in shown


def test_file_secret_is_read_and_stripped(tmp_path: Path) -> None:
    """file:/path reads the file, without its trailing newline, and never shows it."""
    path = tmp_path / "hmac"
    path.write_text(TOKEN + "\n")
    cfg = parse_config_text(f'[[alert.webhook]]\nurl = "http://a"\nhmac_secret = "file:{path}"')
    secret = cfg.alert.webhook[0].hmac_secret
    assert secret is not None
    assert secret.reveal() == TOKEN
    assert repr(secret) == f"Secret(file:{path})"
    assert TOKEN not in repr(cfg)


def test_inline_secret_is_shown_as_inline() -> None:
    """A header given inline is a Secret too, shown only as Secret(inline)."""
    cfg = parse_config_text(f'[[alert.webhook]]\nurl = "http://a"\nheaders = {{ X = "{TOKEN}" }}')
    secret = cfg.alert.webhook[0].headers["X"]
    assert secret.reveal() == TOKEN
    assert repr(secret) == str(secret) == "Secret(inline)"
    assert TOKEN not in repr(cfg)


@given(st.text(min_size=1).map(lambda s: "§" + s))
def test_secret_repr_never_contains_the_value(value: str) -> None:
    """Whatever the value, a Secret's repr and str show its source, never the value."""
    for source in ("env:TOKEN", "file:/etc/qmpwatch/token", value):
        secret = Secret(source, value)
        assert value not in repr(secret)
        assert value not in str(secret)
        assert secret.reveal() == value


def test_missing_env_var_is_reported_without_leaking_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unset env: variable names the key and the variable, and shows no secret value."""
    monkeypatch.delenv("QMPWATCH_WEBHOOK_TOKEN", raising=False)
    monkeypatch.setenv("QMPWATCH_OTHER_TOKEN", TOKEN)
    text = DESIGN_EXAMPLE + (
        '\n[[alert.webhook]]\nurl = "http://b"\nheaders = { X = "env:QMPWATCH_OTHER_TOKEN" }\n'
    )
    found = problems_of(text)
    assert found == [
        "alert.webhook[0].headers.Authorization: "
        "environment variable QMPWATCH_WEBHOOK_TOKEN is not set"
    ]
    assert TOKEN not in "\n".join(found)


def test_unreadable_secret_file_is_reported_without_its_content(tmp_path: Path) -> None:
    """A missing or non-UTF-8 secret file is a problem naming the key, never the content."""
    binary = tmp_path / "binary-secret"
    binary.write_bytes(b"\xffSECRETBYTES")
    found = problems_of(
        f'[[alert.webhook]]\nurl = "http://a"\nhmac_secret = "file:{tmp_path}/nope"\n'
        f'[[alert.webhook]]\nurl = "http://b"\nhmac_secret = "file:{binary}"\n'
    )
    assert found == [
        f"alert.webhook[0].hmac_secret: cannot read secret file {tmp_path}/nope: "
        "No such file or directory",
        f"alert.webhook[1].hmac_secret: cannot read secret file {binary}: not UTF-8 text",
    ]
    assert "SECRETBYTES" not in "\n".join(found)


# ---------------------------------------------------------------------------------------------
# qmpwatch check-config, the real command


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmpwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMPWATCH_")}
    return env | extra


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    """check-config on design.md's example exits 0 and says OK with what it found."""
    path = tmp_path / "config.toml"
    path.write_text(DESIGN_EXAMPLE)
    done = check_config(path, _env(QMPWATCH_WEBHOOK_TOKEN=TOKEN))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"{path}: OK (1 VM(s), 1 discovery glob(s), 0 listen socket(s), "
        "0 libvirt connection(s), 3 alert sink(s))"
    )
    assert TOKEN not in done.stdout + done.stderr


def test_check_config_rejects_a_bad_file_on_stderr(tmp_path: Path) -> None:
    """check-config on a bad file exits non-zero, every problem on stderr, nothing leaked."""
    path = tmp_path / "config.toml"
    path.write_text(
        DESIGN_EXAMPLE.replace("timeout_s = 5.0", 'timeout_s = "soon"').replace(
            "stop_after_shutdown_s", "stop_after_shutdwn_s"
        )
    )
    done = check_config(path, _env(QMPWATCH_UNRELATED=TOKEN))
    assert done.returncode != 0
    assert done.stdout == ""
    assert 'connect.timeout_s: expected a number, got "soon"' in done.stderr
    assert (
        "followup.stop_after_shutdwn_s: unknown key (did you mean stop_after_shutdown_s?)"
        in done.stderr
    )
    assert "environment variable QMPWATCH_WEBHOOK_TOKEN is not set" in done.stderr
    assert str(path) in done.stderr
    assert TOKEN not in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_of_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    """check-config on a file that does not exist exits non-zero with one clear line."""
    done = check_config(tmp_path / "nope.toml", _env())
    assert done.returncode != 0
    assert "cannot read" in done.stderr
    assert "Traceback" not in done.stderr


def test_datetime_value_is_reported_not_crashed() -> None:
    """A TOML date where a number belongs is an error naming the key."""
    found = problems_of("[connect]\ntimeout_s = 2024-01-01T00:00:00Z")
    when = datetime(2024, 1, 1, tzinfo=UTC)
    assert found == [f"connect.timeout_s: expected a number, got {when}"]


def test_protection_ignore_per_vm_and_bad_names() -> None:
    """[protection] ignore and [protection.vm.NAME] ignore add up for that VM; an unknown gap
    is named with its key and the VM."""
    cfg = parse_config_text(
        '[protection]\nignore = ["no_watchdog"]\n'
        '[protection.vm.web01]\nignore = ["disk_errors_reported_to_guest:drive0"]\n'
    )
    assert cfg.protection.ignored_for("web01") == (
        "no_watchdog",
        "disk_errors_reported_to_guest:drive0",
    )
    assert cfg.protection.ignored_for("db01") == ("no_watchdog",)
    with pytest.raises(ConfigError) as caught:
        parse_config_text('[protection.vm.web01]\nignore = ["no_wdog"]\n')
    assert caught.value.problems[0].startswith(
        'protection.vm.web01.ignore[0]: unknown gap "no_wdog" (known: disk_errors_ignored,'
    )
