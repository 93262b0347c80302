"""The [[libvirt]] source's pure parts: libvirt's states as query-status words, how a stopped
domain's link ends, and its configuration."""

from __future__ import annotations

import libvirt
import pytest

from qmpwatch.core.config import LibvirtConfig, parse_config_text
from qmpwatch.core.errors import ConfigError
from qmpwatch.sources import registry
from qmpwatch.sources.libvirtlink import (
    STATUS_WORDS,
    STOPPED_WORDS,
    end_cause_of,
    status_word,
)

QUERY_STATUS_WORDS = frozenset(
    {"running", "paused", "shutdown", "io-error", "watchdog", "guest-panicked", "internal-error",
     "debug", "prelaunch", "inmigrate", "finish-migrate", "postmigrate", "save-vm",
     "restore-vm", "suspended", "colo"}
)  # fmt: skip
STATES = ["NOSTATE", "RUNNING", "BLOCKED", "PAUSED", "SHUTDOWN", "SHUTOFF", "CRASHED",
          "PMSUSPENDED"]  # fmt: skip


def _reasons(state: str) -> dict[int, str]:
    """libvirt-python's reasons of `state`: number -> name (VIR_DOMAIN_<STATE>_<REASON>)."""
    prefix = f"VIR_DOMAIN_{state}_"
    return {
        value: name[len(prefix) :]
        for name, value in vars(libvirt).items()
        if name.startswith(prefix) and isinstance(value, int) and not name.endswith("_LAST")
    }


def test_the_state_numbers_are_libvirts() -> None:
    """The table's states are libvirt-python's VIR_DOMAIN_<STATE> numbers, all of them."""
    assert [getattr(libvirt, f"VIR_DOMAIN_{s}") for s in STATES] == list(STATUS_WORDS)


@pytest.mark.parametrize("state", STATES)
def test_every_documented_reason_has_a_word_or_a_reason_for_none(state: str) -> None:
    """Every (state, reason) libvirt-python documents maps to a word of QEMU's
    query-status, except
    no state and shut off (no QEMU); paused reasons are each named in the table."""
    number = getattr(libvirt, f"VIR_DOMAIN_{state}")
    for reason in _reasons(state):
        word = status_word(number, reason)
        if state in ("NOSTATE", "SHUTOFF"):
            assert word is None
        else:
            assert word in QUERY_STATUS_WORDS
    if state == "PAUSED":
        assert set(_reasons(state)) <= set(STATUS_WORDS[number])


@pytest.mark.parametrize(
    ("state", "reason", "word"),
    [
        ("RUNNING", "UNPAUSED", "running"),
        ("PAUSED", "USER", "paused"),
        ("PAUSED", "IOERROR", "io-error"),
        ("PAUSED", "WATCHDOG", "watchdog"),
        ("PAUSED", "CRASHED", "guest-panicked"),
        ("PAUSED", "SHUTTING_DOWN", "shutdown"),
        ("PAUSED", "STARTING_UP", "prelaunch"),
        ("PAUSED", "MIGRATION", "finish-migrate"),
        ("PAUSED", "SNAPSHOT", "save-vm"),
        ("CRASHED", "PANICKED", "guest-panicked"),
        ("PMSUSPENDED", "UNKNOWN", "suspended"),
        ("SHUTDOWN", "USER", "running"),
        ("SHUTOFF", "DESTROYED", None),
    ],
)
def test_states_map_to_query_status_words(state: str, reason: str, word: str | None) -> None:
    """The pairs the alerts depend on."""
    number = getattr(libvirt, f"VIR_DOMAIN_{state}")
    assert status_word(number, getattr(libvirt, f"VIR_DOMAIN_{state}_{reason}")) == word


def test_a_reason_newer_than_the_table_takes_its_states_word() -> None:
    """An unknown reason of a known state: the state's default; an unknown state: None."""
    assert status_word(libvirt.VIR_DOMAIN_PAUSED, 99) == "paused"
    assert status_word(libvirt.VIR_DOMAIN_RUNNING, 99) == "running"
    assert status_word(42, 0) is None


def test_a_stopped_domain_ends_its_link_as_a_crash_only_when_qemu_failed() -> None:
    """stopped/failed and stopped/crashed are QEMU going away (eof); every other detail is
    a clean end (exited); the numbers are libvirt-python's."""
    for detail, word in STOPPED_WORDS.items():
        assert getattr(libvirt, f"VIR_DOMAIN_EVENT_STOPPED_{word.upper()}") == detail
    causes = {word: end_cause_of(detail)[0] for detail, word in STOPPED_WORDS.items()}
    assert causes == {
        "shutdown": "exited",
        "destroyed": "exited",
        "crashed": "eof",
        "migrated": "exited",
        "saved": "exited",
        "failed": "eof",
        "from_snapshot": "exited",
    }
    assert end_cause_of(77)[0] == "eof"  # unknown: assume the worst


def test_libvirt_entries_parse_with_their_defaults() -> None:
    """[[libvirt]] takes uri (default qemu:///system) and domains (default every one)."""
    cfg = parse_config_text(
        '[[libvirt]]\n[[libvirt]]\nuri = "qemu+ssh://h/system"\ndomains = ["web*", "db?"]\n'
    )
    assert cfg.libvirt == (
        LibvirtConfig("qemu:///system", ("*",)),
        LibvirtConfig("qemu+ssh://h/system", ("web*", "db?")),
    )
    assert registry.configured(cfg) == ["libvirt"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[libvirt]]\nuri = 'system'",
         'libvirt[0].uri: expected a libvirt URI such as "qemu:///system", got "system"'),
        ("[[libvirt]]\n[[libvirt]]",
         'libvirt[1].uri: "qemu:///system" is already watched by libvirt[0]'),
        ("[[libvirt]]\ndomains = 'web*'",
         'libvirt[0].domains: expected a non-empty array of domain name globs, got "web*"'),
        ("[[libvirt]]\ndomains = []",
         "libvirt[0].domains: expected a non-empty array of domain name globs, got an array"),
        ("[[libvirt]]\ndomain = ['a']", "libvirt[0].domain: unknown key (did you mean domains?)"),
    ],
)  # fmt: skip
def test_bad_libvirt_entries_name_the_key(text: str, problem: str) -> None:
    """Each problem names the entry and the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    assert problem in caught.value.problems
