"""Text from peers made safe to show: control characters escaped. Pure.

A guest or a local user chooses event names, error texts and VM names; shown raw, an escape
sequence among them would drive the terminal of whoever reads `qmpwatch tail`, or reach an
exec sink's environment.
"""

from __future__ import annotations

# C0 (with DEL) and C1 control characters -> a visible escape: ESC -> "\x1b".
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """`text` with every C0/C1 control character (ESC, CR, LF, BEL, NUL, CSI...) escaped."""
    return text.translate(_CONTROLS)
