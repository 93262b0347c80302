"""The exception hierarchy of qmpwatch.

QmpwatchError
 ├── ConfigError        a configuration file is unreadable or invalid (names the key)
 ├── DecodeError        a QMP message is not JSON, not an object, or breaks the spec's types
 └── SessionError       a QMP session could not be set up or ended abnormally
      └── ConnectFailed  an attempt to attach failed; `reason` is a short stable word
"""

from __future__ import annotations


class QmpwatchError(Exception):
    """Root of every error qmpwatch raises on purpose."""


class ConfigError(QmpwatchError):
    """A configuration problem; `problems` holds one "key: what is wrong" line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DecodeError(QmpwatchError):
    """A QMP message that cannot be decoded; `raw` keeps the text as received."""

    def __init__(self, error: str, raw: str) -> None:
        super().__init__(error)
        self.error = error
        self.raw = raw


class SessionError(QmpwatchError):
    """A QMP session problem."""


class ConnectFailed(SessionError):
    """Attaching to a monitor failed; `reason` is one of a few stable words for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
