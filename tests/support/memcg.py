"""A throwaway memory cgroup with a limit, for OOM-killing a real QEMU (v1 or v2).

`MemoryCgroup.make()` uses the memory controller wherever this machine has it: cgroup v1's
`/sys/fs/cgroup/memory`, else a cgroup v2 hierarchy whose `cgroup.controllers` lists `memory`
(at `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`). Where neither can be used (no controller,
no permission) it raises `MemcgUnavailable` saying what is missing; tests fail with it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemcgUnavailable(Exception):
    """No memory cgroup can be made here; the message says why."""


@dataclass(frozen=True, slots=True)
class MemoryCgroup:
    """One cgroup directory with a memory limit; `path` is as the kernel log names it."""

    directory: Path
    path: str  # e.g. /qmpwatch-oom-1a2b3c4d
    version: int

    @classmethod
    def make(cls, limit_bytes: int) -> MemoryCgroup:
        name = f"qmpwatch-oom-{uuid.uuid4().hex[:8]}"
        tried = []
        v1 = ROOT / "memory"
        if (v1 / "memory.limit_in_bytes").exists():
            try:
                d = v1 / name
                d.mkdir()
                (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
                return cls(d, "/" + name, 1)
            except OSError as err:
                tried.append(f"cgroup v1 {v1}: {err.strerror}")
        for base in (ROOT, ROOT / "unified"):
            controllers = base / "cgroup.controllers"
            try:
                has_memory = "memory" in controllers.read_text().split()
            except OSError:
                continue
            if not has_memory:
                tried.append(f"cgroup v2 {base}: no memory controller")
                continue
            try:
                (base / "cgroup.subtree_control").write_text("+memory")
                d = base / name
                d.mkdir()
                (d / "memory.max").write_text(str(limit_bytes))
                (d / "memory.swap.max").write_text("0")
                return cls(d, "/" + name, 2)
            except OSError as err:
                tried.append(f"cgroup v2 {base}: {err.strerror}")
        raise MemcgUnavailable(
            "no memory cgroup can be made on this machine (needs root and the memory "
            "controller of cgroup v1 or v2): " + ("; ".join(tried) or "no cgroup mount found")
        )

    def add(self, pid: int) -> None:
        (self.directory / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone (a killed QEMU takes a moment)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.directory.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the killed process is still leaving: poll, bounded
