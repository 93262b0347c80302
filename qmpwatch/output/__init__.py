"""Records out: JSON lines or console lines, written once per event-loop turn."""
