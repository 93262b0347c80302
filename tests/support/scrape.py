"""Reading a running daemon's HTTP endpoint the way Prometheus and a health probe do.

- `get(port, path)`: (status, body text) of one GET on 127.0.0.1, bounded in time.
- `sample(text, name, **labels)` / `samples(text)`: values out of a `/metrics` scrape.
- `wait_healthz(port, condition)`: poll `/healthz` until its JSON satisfies `condition`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

DEADLINE_S = 5.0


async def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH; (status, body)."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def scrape(port: int) -> str:
    status, text = await get(port, "/metrics")
    assert status == 200, text
    return text


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name` whose labels include `labels`."""
    for s in samples(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


async def wait_healthz(
    port: int, condition: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll /healthz until `condition(body)`; return the body (with `http_status` added)."""
    body: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                status, text = await get(port, "/healthz")
                body = {**json.loads(text), "http_status": status}
                if condition(body):
                    return body
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"/healthz: condition not met within {timeout} s; last: {body}")
