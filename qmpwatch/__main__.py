"""`python -m qmpwatch` runs the command line."""

from __future__ import annotations

from qmpwatch.cli import main

raise SystemExit(main())
