"""Discovery: `[[discover]] glob = "/run/qemu/*.qmp"` -> one VM per matching unix socket.

The VM's name is the file name without its extension. Only unix sockets count; a symlink
that leads out of the glob's directory is ignored (so a writable socket directory cannot
point qmpwatch at arbitrary sockets). Rescanning is a cheap `glob` every `interval_s`; the
supervisor diffs the result against what runs.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable
from pathlib import PurePath

from qmpwatch.config import DiscoverConfig


def _inside(path: str, directory: str) -> bool:
    real = os.path.realpath(path)
    root = os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root


def discover(globs: Iterable[DiscoverConfig]) -> dict[str, tuple[str, DiscoverConfig]]:
    """Socket path -> (VM name, the glob that found it), for every matching unix socket."""
    found: dict[str, tuple[str, DiscoverConfig]] = {}
    for rule in globs:
        directory = os.path.dirname(rule.glob) or "."
        for path in sorted(glob.glob(rule.glob)):
            if path in found:
                continue
            try:
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    continue
            except OSError:
                continue  # vanished, or not ours to look at
            if os.path.islink(path) and not _inside(path, directory):
                continue
            found[path] = (PurePath(path).stem, rule)
    return found
