"""The pure core: decoder, configuration, follow-up rules, alerts and the per-VM watch.

Imports neither asyncio nor qemu.qmp; time is passed in."""
