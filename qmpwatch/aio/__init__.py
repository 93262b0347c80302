"""Small asyncio helpers shared by the I/O layers."""
