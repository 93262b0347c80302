"""Where a discovered socket may lead: the directory of its glob, symlinks resolved."""

from __future__ import annotations

import glob
import os


def inside(path: str, directory: str) -> bool:
    """Whether `path`, all symlinks resolved, is within `directory` (resolved too)."""
    real = os.path.realpath(path)
    root = os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root


def glob_root(pattern: str) -> str:
    """The directory every match of `pattern` must stay in: its part before any wildcard."""
    directory = os.path.dirname(pattern)
    while glob.has_magic(directory):
        directory = os.path.dirname(directory)
    return directory or "."
