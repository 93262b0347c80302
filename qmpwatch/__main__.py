"""`python -m qmpwatch` runs the command line."""

from __future__ import annotations

from qmpwatch.cli.main import main

raise SystemExit(main())
