"""The examples of a QMP events document, extracted from its text (the test corpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent.parent / "data"
NEWEST = DATA / "qmp-events.txt"
OLDER = DATA / "qmp-events.older.txt"


def examples(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(section title, example object) for every `Example:` block of the document."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found: list[tuple[str, dict[str, Any]]] = []
    section = ""
    for i, line in enumerate(lines):
        if set(line.strip()) == {"-"} and i > 0:
            section = lines[i - 1].strip()
        if line.strip() != "Example:":
            continue
        start = text.index("{", sum(len(x) + 1 for x in lines[: i + 1]))
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append((section, json.loads(text[start : end + 1])))
    return found
