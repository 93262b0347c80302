"""The alert delivery keys of the config: defaults, values, errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpwatch.alerts.dispatch import build_sinks
from qmpwatch.core.config import AlertConfig, Config, Secret, parse_config, parse_config_text
from qmpwatch.core.errors import ConfigError


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config_text(text)
    return err.value.problems


def test_defaults() -> None:
    """Without alert keys: hostname as host, 10000 entries, 1 s .. 60 s backoff."""
    cfg = parse_config_text("[[alert.alertmanager]]\nurl = 'http://am:9093'\n").alert
    assert (cfg.host, cfg.outbox_max_entries, cfg.retry_initial_s, cfg.retry_max_s) == (
        "",
        10000,
        1.0,
        60.0,
    )
    (am,) = cfg.alertmanager
    assert (am.timeout_s, am.resend_interval_s, dict(am.headers)) == (5.0, 60.0, {})


def test_all_new_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every alert delivery key is read, secrets from env:/file: as for webhook headers."""
    monkeypatch.setenv("AM_TOKEN", "am-token-1")
    (tmp_path / "pager").write_text("pager-token-2\n")
    cfg = parse_config_text(
        f"""
        [alert]
        host = "hv03"
        outbox_max_entries = 500
        retry_initial_s = 0.5
        retry_max_s = 30

        [[alert.alertmanager]]
        url = "http://am1:9093"
        resend_interval_s = 30
        headers = {{ Authorization = "env:AM_TOKEN" }}

        [[alert.exec]]
        command = ["/usr/local/bin/page-oncall", "--team", "infra"]
        timeout_s = 3
        env = {{ PAGER_TOKEN = "file:{tmp_path}/pager", MODE = "live" }}
        """
    ).alert
    assert (cfg.host, cfg.outbox_max_entries, cfg.retry_initial_s, cfg.retry_max_s) == (
        "hv03",
        500,
        0.5,
        30.0,
    )
    (am,) = cfg.alertmanager
    assert am.resend_interval_s == 30.0
    assert am.headers["Authorization"].reveal() == "am-token-1"
    (ex,) = cfg.exec
    assert ex.timeout_s == 3.0
    assert ex.env["PAGER_TOKEN"].reveal() == "pager-token-2"
    assert ex.env["MODE"].reveal() == "live"
    assert {s.reveal() for s in cfg.secrets()} == {"am-token-1", "pager-token-2", "live"}
    assert "am-token-1" not in repr(cfg)
    assert "pager-token-2" not in repr(cfg)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[alert]\noutbox_max_entries = 0", "alert.outbox_max_entries: must be at least 1, got 0"),
        (
            "[alert]\noutbox_max_entries = 10.5",
            "alert.outbox_max_entries: expected an integer, got 10.5",
        ),
        (
            "[alert]\nretry_initial_s = 5\nretry_max_s = 1",
            "alert.retry_max_s: must not be less than retry_initial_s (5)",
        ),
        (
            "[alert]\nretry_initial_s = 0",
            "alert.retry_initial_s: must be a number greater than 0, got 0",
        ),
        ("[alert]\nhost = 7", "alert.host: expected a string, got 7"),
        (
            "[[alert.alertmanager]]\nurl = 'http://a'\nresend_interval_s = -1",
            "alert.alertmanager[0].resend_interval_s: must be a number greater than 0, got -1",
        ),
        (
            "[[alert.alertmanager]]\nurl = 'http://a'\nheaders = 'x'",
            'alert.alertmanager[0].headers: expected a table, got "x"',
        ),
        (
            "[[alert.exec]]\ncommand = ['/bin/true']\nenv = { A = 1 }",
            "alert.exec[0].env.A: expected a string, got 1",
        ),
        (
            "[[alert.exec]]\ncommand = ['/bin/true']\nenv = { A = 'env:QMPWATCH_TEST_UNSET_VAR' }",
            "alert.exec[0].env.A: environment variable QMPWATCH_TEST_UNSET_VAR is not set",
        ),
        (
            "[[alert.alertmanager]]\nurl = 'http://a'\nresend = 5",
            "alert.alertmanager[0].resend: unknown key",
        ),
        ("[alert]\noutbox_size = 5", "alert.outbox_size: unknown key"),
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    """Each bad value is reported as "key: what is wrong"; unknown keys too."""
    assert problems(text) == [expected]


def test_secret_file_content_never_in_errors(tmp_path: Path) -> None:
    """An exec env secret that fails is named by key and source, never by value."""
    assert problems(f"[[alert.exec]]\ncommand = ['x']\nenv = {{ A = 'file:{tmp_path}/none' }}")[
        0
    ].startswith(f"alert.exec[0].env.A: cannot read secret file {tmp_path}/none")


def test_sink_ids_are_stable_and_distinct() -> None:
    """Sink ids follow the receiver (URL/argv), not the config order; duplicates differ."""
    a = AlertConfig(
        webhook=(
            _hook("http://a"),
            _hook("http://b"),
            _hook("http://a"),
        )
    )
    b = AlertConfig(webhook=(_hook("http://b"), _hook("http://a")))
    ids_a = [s.sink_id for s in build_sinks(a, host="h", active=list, clock=lambda: 0.0)]
    ids_b = [s.sink_id for s in build_sinks(b, host="h", active=list, clock=lambda: 0.0)]
    assert len(set(ids_a)) == 3
    assert ids_b == [ids_a[1], ids_a[0]]
    assert all("http" not in i for i in ids_a)


def _hook(url: str) -> Any:
    from qmpwatch.core.config import WebhookConfig

    return WebhookConfig(url, headers={"X": Secret("inline", "s")})


VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=2),
)
ALERT_KEYS = ["host", "outbox_max_entries", "retry_initial_s", "retry_max_s", "typo"]
SINK_KEYS = ["url", "headers", "timeout_s", "resend_interval_s", "command", "env", "typo"]


@given(
    st.dictionaries(st.sampled_from(ALERT_KEYS), VALUES),
    st.lists(st.dictionaries(st.sampled_from(SINK_KEYS), VALUES), max_size=2),
    st.lists(st.dictionaries(st.sampled_from(SINK_KEYS), VALUES), max_size=2),
)
def test_any_alert_values_give_a_config_or_a_config_error(
    alert: dict[str, Any], managers: list[dict[str, Any]], execs: list[dict[str, Any]]
) -> None:
    """Whatever sits under the delivery keys, parsing ends in a ConfigError saying what is
    wrong, or a Config that let no unknown key through and dropped no sink."""
    result: Config | ConfigError
    try:
        result = parse_config({"alert": {**alert, "alertmanager": managers, "exec": execs}})
    except ConfigError as err:
        result = err
    if isinstance(result, ConfigError):
        assert result.problems
        assert all(": " in p for p in result.problems)
        return
    # Accepted: no unknown key let through, no configured sink dropped.
    assert "typo" not in alert
    assert all("typo" not in sink for sink in [*managers, *execs])
    assert (len(result.alert.alertmanager), len(result.alert.exec)) == (len(managers), len(execs))
