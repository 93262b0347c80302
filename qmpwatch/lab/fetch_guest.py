"""``python -m qmpwatch.lab.fetch_guest [DIR]``: fetch the lab's real Linux guest into DIR
(default .cache/guest) unless it is there (`qmpwatch.lab.guestkit.fetch_kit`)."""

from __future__ import annotations

import sys
from pathlib import Path

from qmpwatch.lab.errors import LabError
from qmpwatch.lab.guestkit import DEFAULT_DIR, fetch_kit


def main(argv: list[str]) -> int:
    """Fetch the kit; print where it is (exit 0), or why it could not be made (exit 1)."""
    directory = Path(argv[0]) if argv else DEFAULT_DIR
    try:
        kit = fetch_kit(directory)
    except LabError as err:
        print(f"fetch_guest: {err}", file=sys.stderr)
        return 1
    print(f"fetch_guest: {(kit.root / 'complete').read_text().strip()} in {kit.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
