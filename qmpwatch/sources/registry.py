"""The registry of sources: a configuration section -> the class that serves it.

A source's module is imported only when the configuration has entries of its kind, so an
optional integration (libvirt) costs nothing, and needs nothing installed, until it is used.
"""

from __future__ import annotations

import importlib
from typing import cast

from qmpwatch.core.config import Config
from qmpwatch.sources.base import SourceFactory

# Config attribute (its TOML array of tables) -> "module:Class".
SOURCES: dict[str, str] = {
    "vms": "qmpwatch.sources.dial:DialSource",
    "discover": "qmpwatch.sources.discover:DiscoverSource",
    "listen": "qmpwatch.sources.listen:ListenSource",
    "libvirt": "qmpwatch.sources.libvirt:LibvirtSource",
}


def configured(config: Config) -> list[str]:
    """The sources `config` has entries for, in registry order."""
    return [kind for kind in SOURCES if getattr(config, kind)]


def load(kind: str) -> SourceFactory:
    """The class of source `kind`, imported now."""
    module, _, name = SOURCES[kind].partition(":")
    return cast(SourceFactory, getattr(importlib.import_module(module), name))
