"""Every option and command of the command line says what it is for in --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

from qmpwatch.cli.main import _parser


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    top = _parser()
    found = [("qmpwatch", top)]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(f"qmpwatch {name}", p) for name, p in action.choices.items()]
    return found


def test_every_option_and_argument_has_help_text() -> None:
    """No option, argument or command without help (the issue's first-day papercut)."""
    missing = []
    for prog, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{prog} {choice.dest}"
                    for choice in action._choices_actions
                    if not (choice.help or "").strip()
                ]
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_help_of_each_command_prints() -> None:
    """`qmpwatch COMMAND --help` exits 0 for every command, and the options appear in it."""
    for prog, parser in _parsers()[1:]:
        command = prog.split()[1]
        result = subprocess.run(
            [sys.executable, "-m", "qmpwatch", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        for action in parser._actions:
            for option in action.option_strings:
                assert option in result.stdout, (prog, option)
