"""Discovery: `[[discover]] glob = "/run/qemu/*.qmp"` -> one VM per matching unix socket.

The VM's name is the file name without its extension. Only unix sockets count; a match whose
real path leads out of the glob's directory (`glob_root`: for `/run/qemu/*/*.qmp` that is
/run/qemu) through a symlink, of the file or of a directory the glob matched, is ignored, so a
writable socket directory cannot point qmpwatch at arbitrary sockets. The connection checks
this again on every attempt (a link can change after it was found). Rescanning is a cheap
`glob` every `interval_s`; the supervisor diffs the result against what runs.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable
from pathlib import PurePath

from qmpwatch.config import DiscoverConfig


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


def discover(globs: Iterable[DiscoverConfig]) -> dict[str, tuple[str, DiscoverConfig]]:
    """Socket path -> (VM name, the glob that found it), for every matching unix socket."""
    found: dict[str, tuple[str, DiscoverConfig]] = {}
    for rule in globs:
        directory = glob_root(rule.glob)
        for path in sorted(glob.glob(rule.glob)):
            if path in found:
                continue
            try:
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    continue
            except OSError:
                continue  # vanished, or not ours to look at
            if not inside(path, directory):
                continue
            found[path] = (PurePath(path).stem, rule)
    return found
