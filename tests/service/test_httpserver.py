"""The HTTP endpoint: /metrics scraped and parsed, /healthz, listening and stopping."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qmpwatch.core.events import Event, decode
from qmpwatch.service.httpserver import Health, HttpServer, ListenError, parse_listen
from qmpwatch.service.metrics import Metrics

DEADLINE_S = 5.0
T0 = 1_700_000_000


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose every request has a deadline."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as session:
        yield session


def feed(metrics: Metrics) -> None:
    for name, micro in (("STOP", 0), ("RESUME", 1000), ("STOP", 2000)):
        stamp = {"seconds": T0, "microseconds": micro}
        event = decode(orjson.dumps({"event": name, "timestamp": stamp}))
        assert isinstance(event, Event)
        metrics.observe_event("web01", event, T0 + micro / 1e6 + 0.002)
    metrics.observe_record(
        "web01",
        "followup_missed",
        {
            "cause": "WATCHDOG",
            "expected": "RESET",
            "rule": "reset_after_watchdog",
            "deadline_s": 5.0,
            "reason": "deadline",
        },
        T0 + 10,
    )
    metrics.set_status("web01", "running")
    metrics.outbox_depth_from(lambda: 3)


async def test_metrics_scrape_parses(client: aiohttp.ClientSession) -> None:
    """/metrics serves the Prometheus text format with the values fed in."""
    metrics = Metrics()
    feed(metrics)
    async with HttpServer("127.0.0.1:0", metrics, lambda: Health(True)) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with client.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    events = {
        (s.labels["vm"], s.labels["event"]): s.value
        for s in families["qmpwatch_events"].samples
        if s.name == "qmpwatch_events_total"
    }
    assert events == {("web01", "STOP"): 2, ("web01", "RESUME"): 1}
    lag = {
        s.name: s.value
        for s in families["qmpwatch_event_lag_seconds"].samples
        if s.labels.get("le") in (None, "0.0025")
    }
    assert lag["qmpwatch_event_lag_seconds_count"] == 3
    assert lag["qmpwatch_event_lag_seconds_bucket"] == 3
    followups = families["qmpwatch_followups"].samples
    assert [
        (s.labels["rule"], s.labels["outcome"], s.value)
        for s in followups
        if s.name.endswith("_total")
    ] == [("reset_after_watchdog", "missed", 1)]
    status = families["qmpwatch_vm_status"].samples
    assert [(s.labels, s.value) for s in status] == [({"vm": "web01", "status": "running"}, 1)]
    assert families["qmpwatch_outbox_depth"].samples[0].value == 3


async def test_metrics_openmetrics_on_request(client: aiohttp.ClientSession) -> None:
    """A scraper asking for OpenMetrics gets it, ending with # EOF."""
    async with HttpServer("127.0.0.1:0", Metrics(), lambda: Health(True)) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with client.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")


async def test_healthz_follows_the_callback(client: aiohttp.ClientSession) -> None:
    """/healthz is 200 with the detail while healthy, 503 with the same shape when not."""
    report = Health(True, {"config_loaded": True, "vms": 2, "connected": 1})

    def health() -> Health:
        return report

    async with HttpServer("127.0.0.1:0", Metrics(), health) as server:
        url = f"http://127.0.0.1:{server.port}/healthz"
        async with client.get(url) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.json() == {
                "status": "ok",
                "config_loaded": True,
                "vms": 2,
                "connected": 1,
            }
        report = Health(False, {"config_loaded": False, "status": "ignored"})
        async with client.get(url) as response:
            assert response.status == 503
            assert await response.json() == {"status": "unhealthy", "config_loaded": False}


async def test_healthz_broken_callback_is_503(client: aiohttp.ClientSession) -> None:
    """A health callback that raises makes /healthz 503 with the error, not a 500."""

    def health() -> Health:
        raise RuntimeError("no config yet")

    async with (
        HttpServer("127.0.0.1:0", Metrics(), health) as server,
        client.get(f"http://127.0.0.1:{server.port}/healthz") as response,
    ):
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "unhealthy"
    assert "no config yet" in body["error"]


async def test_unknown_path_is_404(client: aiohttp.ClientSession) -> None:
    """Only /metrics and /healthz exist."""
    async with (
        HttpServer("127.0.0.1:0", Metrics(), lambda: Health(True)) as server,
        client.get(f"http://127.0.0.1:{server.port}/") as response,
    ):
        assert response.status == 404


async def test_serve_in_a_taskgroup(client: aiohttp.ClientSession) -> None:
    """serve() listens until its task is cancelled, then the port is closed."""
    server = HttpServer("127.0.0.1:0", Metrics(), lambda: Health(True))
    async with asyncio.timeout(DEADLINE_S), asyncio.TaskGroup() as tg:
        task = tg.create_task(server.serve())
        await server.listening.wait()
        async with client.get(f"http://127.0.0.1:{server.port}/healthz") as response:
            assert response.status == 200
        task.cancel()
    assert not server.listening.is_set()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S),
    ):
        pass


async def test_address_in_use_is_a_listen_error() -> None:
    """A port already taken gives ListenError naming metrics_listen and the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(f"127.0.0.1:{port}", Metrics(), lambda: Health(True))
        with pytest.raises(ListenError, match=rf"metrics_listen: .*127\.0\.0\.1:{port}"):
            await server.start()
    assert not server.listening.is_set()


async def test_ipv6_loopback(client: aiohttp.ClientSession) -> None:
    """An IPv6 address in brackets is accepted."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback address here")
    async with (
        HttpServer("[::1]:0", Metrics(), lambda: Health(True)) as server,
        client.get(f"http://[::1]:{server.port}/healthz") as response,
    ):
        assert response.status == 200


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9752", ("127.0.0.1", 9752)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9752", ("::1", 9752)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    """HOST:PORT splits at the last colon; IPv6 hosts lose their brackets."""
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9752", ":9752", "host:", "host:http", "host:70000"])
def test_parse_listen_rejects(listen: str) -> None:
    """Anything but HOST:PORT is a ListenError."""
    with pytest.raises(ListenError, match="metrics_listen"):
        parse_listen(listen)
