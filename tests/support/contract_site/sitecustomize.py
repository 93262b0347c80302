"""Tee the contract keys of a qmpwatch child process to the suite's contract plugin.

The suite's plugin (`tests.support.contract`) puts this directory first on $PYTHONPATH and
names a directory in $QMPWATCH_CONTRACT_DIR. Python imports this module at start; it does
nothing until qmpwatch's own modules load, then wraps, from the outside (qmpwatch has no test
hook): `LineWriter._write` (every JSON line the process writes), `Metrics.render` and
`HttpServer._metrics` (every `/metrics` page) and `health.degraded_reasons`. Each key seen
for the first time is appended to a file of its own in that directory, one line each:
`table<TAB>name as JSON<TAB>origin<TAB>test` (origin `replay` for `qmpwatch replay`, else
`live`; test: the test that was running when the process began).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from typing import Any

_DIR = os.environ.get("QMPWATCH_CONTRACT_DIR")
_TEST = os.environ.get("QMPWATCH_CONTRACT_TEST", "?")
_seen: set[tuple[str, str]] = set()
_files: list[int] = []  # the one file this process appends to, once opened


def _note(keys: Any) -> None:
    new = [k for k in keys if k not in _seen]
    if not new or _DIR is None:
        return
    _seen.update(new)
    origin = "replay" if "replay" in sys.argv[1:2] else "live"
    text = "".join(f"{t}\t{json.dumps(n)}\t{origin}\t{_TEST}\n" for t, n in new)
    with contextlib.suppress(OSError):
        if not _files:
            _files.append(
                os.open(
                    os.path.join(_DIR, f"{os.getpid()}-{os.urandom(4).hex()}.tsv"),
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                    0o666,
                )
            )
        os.write(_files[0], text.encode("utf-8", "replace"))


def _patch(name: str, module: Any) -> None:
    from contract_keys import (  # type: ignore[import-not-found]  # beside this file
        degraded_keys,
        lines_keys,
        metric_keys,
    )

    if name == "qmpwatch.output.logs":
        write = module.LineWriter._write

        def tee_write(self: Any, data: bytes | bytearray) -> None:
            # What reaches the stream, on the loop or in the log's lane (a thread).
            _note(lines_keys(bytes(data)))
            write(self, data)

        module.LineWriter._write = tee_write
    elif name == "qmpwatch.service.metrics":
        render = module.Metrics.render

        def tee_render(self: Any) -> bytes:
            text: bytes = render(self)
            _note(metric_keys(text.decode("utf-8", "replace")))
            return text

        module.Metrics.render = tee_render
    elif name == "qmpwatch.service.httpserver":
        page = module.HttpServer._metrics

        async def tee_page(self: Any, request: Any) -> Any:
            response = await page(self, request)
            with contextlib.suppress(Exception):
                _note(metric_keys(bytes(response.body).decode("utf-8", "replace")))
            return response

        module.HttpServer._metrics = tee_page
    elif name == "qmpwatch.service.health":
        reasons = module.degraded_reasons

        def tee_reasons(*args: Any, **kwargs: Any) -> Any:
            found = reasons(*args, **kwargs)
            _note(degraded_keys(found))
            return found

        module.degraded_reasons = tee_reasons


_PATCHED = (
    "qmpwatch.output.logs",
    "qmpwatch.service.metrics",
    "qmpwatch.service.httpserver",
    "qmpwatch.service.health",
)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        with contextlib.suppress(Exception):
            _patch(self._name, module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _PATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, name)
        return spec


if _DIR is not None:
    sys.meta_path.insert(0, _Finder())


def _chain() -> None:
    """Run the sitecustomize this one hides (Debian's, say), as Python would have."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        candidate = os.path.join(entry or os.curdir, "sitecustomize.py")
        if os.path.isfile(candidate):
            with contextlib.suppress(Exception), open(candidate, encoding="utf-8") as f:
                code = compile(f.read(), candidate, "exec")
                exec(code, {"__name__": "sitecustomize", "__file__": candidate})
            return


_chain()
