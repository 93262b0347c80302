"""The small pure parts of the trust boundaries: `users` in the config, name pins, escaping
control characters, scrubbing before truncating, and refusals at most once a minute."""

from __future__ import annotations

import base64
import os

import pytest

from qmpwatch.alerts.sinks import scrub, truncate
from qmpwatch.core.config import parse_config_text
from qmpwatch.core.errors import ConfigError
from qmpwatch.core.pins import Owner, refusal
from qmpwatch.core.text import printable
from qmpwatch.sources.trust import Throttle, allowed_uids


def test_users_are_names_or_uids_and_a_bad_one_names_its_key() -> None:
    """users = ["root", 64021] -> uids; an unknown user names the entry and the user."""
    config = parse_config_text('[[listen]]\nsocket = "/run/q.sock"\nusers = ["root", 64021]\n')
    assert config.listen[0].users == (0, 64021)
    with pytest.raises(ConfigError) as err:
        parse_config_text('[[discover]]\nglob = "/run/*.qmp"\nusers = ["no-such-user-qw"]\n')
    assert err.value.problems == ['discover[0].users: no such user "no-such-user-qw"']


def test_default_users_are_root_and_our_own() -> None:
    """An empty `users` believes root and the user qmpwatch runs as, nobody else."""
    assert allowed_uids(()) == {0, os.geteuid()}
    assert allowed_uids((64021,)) == {64021}


def test_a_pinned_name_refuses_another_owner() -> None:
    """Another uid: name_owned; same uid, another socket: name_socket_owned; else allowed."""
    pinned = Owner(64021, "/run/zz/web07.qmp")
    assert refusal(None, Owner(64022)) is None
    assert refusal(pinned, Owner(64022, "/run/aa/web07.qmp")) == "name_owned"
    assert refusal(pinned, Owner(64021, "/run/aa/web07.qmp")) == "name_socket_owned"
    assert refusal(pinned, Owner(64021, "/run/zz/web07.qmp")) is None
    assert refusal(Owner(64021), Owner(64021)) is None


def test_control_characters_are_shown_escaped() -> None:
    """ESC, BEL, CR, LF, NUL, DEL and C1 (CSI) are escaped; other text is kept."""
    assert (
        printable("a\x1b[2Jb\x07\r\n\x00\x7f\x9bé") == "a\\x1b[2Jb\\x07\\x0d\\x0a\\x00\\x7f\\x9bé"
    )


def test_secrets_are_scrubbed_before_truncating() -> None:
    """A token past the cut, a URL's user:password and its Basic form: none survives."""
    token = "tok-0123456789abcdef"
    url = "http://alice:pa%24s@am.example:9093/hook"
    basic = base64.b64encode(b"alice:pa$s").decode()
    text = "x" * 190 + f" {token} Basic {basic} http://bob:pw@elsewhere/ alice:pa$s"
    shown = truncate(scrub(text, [token], url))
    assert "tok-0" not in shown
    assert basic not in scrub(text, [], url)
    assert "pa$s" not in scrub(text, [], url)
    assert "bob:pw" not in scrub(text, [], url)


def test_a_refusal_is_said_at_most_once_a_minute() -> None:
    """The same key: once, then again after the interval; another key at once."""
    now = [0.0]
    throttle = Throttle(60.0, clock=lambda: now[0])
    assert throttle.due(("peer", 1))
    assert not throttle.due(("peer", 1))
    assert throttle.due(("peer", 2))
    now[0] = 60.0
    assert throttle.due(("peer", 1))
