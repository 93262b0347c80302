"""A real Alertmanager for tests: Debian's `prometheus-alertmanager`, one per test.

`running_alertmanager(tmp_dir)` starts it on a free loopback port with a temporary storage
directory, a minimal config (one receiver that sends nothing) and clustering off
(`--cluster.listen-address=`, so parallel instances do not fight over port 9094 and there is
no gossip settle delay), waits for `/-/ready`, and stops it on exit. The `alertmanager`
fixture wraps it; import it into a test module
(`from tests.support.alertmanager import alertmanager`) or a conftest to use it.

    async def test_x(alertmanager: Alertmanager) -> None:
        ...  # configure qmpwatch with url = alertmanager.url
        found = await alertmanager.wait_for(lambda alerts: alertmanager.find(alerts, vm="web01"))

The binary is `$QMPWATCH_ALERTMANAGER`, else `prometheus-alertmanager` (Debian) or
`alertmanager` on PATH; without one the test fails, saying what to install (`make test`
installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tests.support.ports import free_tcp_port

T = TypeVar("T")

CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
receivers:
  - name: "null"
"""


def notifying(url: str) -> str:
    """A configuration that sends every group to the webhook receiver at `url` at once, firing
    and resolved (`send_resolved`), so a test sees what Alertmanager made of its alerts."""
    return f"""\
route:
  receiver: hook
  group_by: ["..."]
  group_wait: 0s
  group_interval: 100ms
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: "{url}"
        send_resolved: true
"""


def binary() -> str | None:
    """The Alertmanager executable, or None."""
    return (
        os.environ.get("QMPWATCH_ALERTMANAGER")
        or shutil.which("prometheus-alertmanager")
        or shutil.which("alertmanager")
    )


@dataclass
class Alertmanager:
    """A running Alertmanager: its base `url` and ways to look at its alerts."""

    url: str
    process: asyncio.subprocess.Process
    log_path: Path
    session: aiohttp.ClientSession = field(repr=False)

    async def alerts(self, **params: str) -> list[dict[str, Any]]:
        """`GET /api/v2/alerts` (only active, unexpired alerts unless params say otherwise)."""
        async with asyncio.timeout(5):
            async with self.session.get(f"{self.url}/api/v2/alerts", params=params) as r:
                r.raise_for_status()
                found: list[dict[str, Any]] = await r.json()
                return found

    @staticmethod
    def find(alerts: list[dict[str, Any]], **labels: str) -> list[dict[str, Any]]:
        """The alerts whose labels include `labels`."""
        return [a for a in alerts if all(a["labels"].get(k) == v for k, v in labels.items())]

    async def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], T], timeout: float = 5.0
    ) -> T:
        """Poll the alerts until `condition(alerts)` is truthy; return it. Fails at `timeout`."""
        last: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    last = await self.alerts()
                    if result := condition(last):
                        return result
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pytest.fail(f"Alertmanager: condition not met within {timeout} s; alerts: {last}")

    async def received(self, status: str) -> float:
        """How many alerts of `status` ("firing", "resolved") it has been posted (API v2), from
        its own `alertmanager_alerts_received_total`."""
        async with asyncio.timeout(5), self.session.get(f"{self.url}/metrics") as r:
            r.raise_for_status()
            text = await r.text()
        for line in text.splitlines():
            if line.startswith("alertmanager_alerts_received_total{") and (
                f'status="{status}"' in line and 'version="v2"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no alertmanager_alerts_received_total for {status}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running_alertmanager(
    tmp_dir: Path, *, port: int | None = None, ready_timeout: float = 15.0, config: str = CONFIG
) -> AsyncIterator[Alertmanager]:
    """Start an Alertmanager under `tmp_dir` (on `port`, else a free one); stop it on exit.

    Its storage survives in `tmp_dir`, so starting again there is a restart. `config` is its
    configuration file's text (default: one receiver that sends nothing).
    """
    exe = binary()
    if exe is None:
        pytest.fail(
            "no Alertmanager binary: apt-get install prometheus-alertmanager "
            "(or set QMPWATCH_ALERTMANAGER); `make test` installs it"
        )
    config_path, log_path = _prepare(tmp_dir, config)
    chosen = port
    for _ in range(1 if chosen else 3):  # a free port may be taken before it is bound
        port = chosen or free_tcp_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                exe,
                f"--config.file={config_path}",
                f"--storage.path={tmp_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        session = aiohttp.ClientSession()
        am = Alertmanager(url, process, log_path, session)
        try:
            if await _ready(am, ready_timeout):
                try:
                    yield am
                finally:
                    await _stop(am)
                return
            await _stop(am)
        except BaseException:
            await _stop(am)
            raise
    pytest.fail(f"Alertmanager did not start; its log:\n{log_path.read_text(errors='replace')}")


def _prepare(tmp_dir: Path, text: str) -> tuple[Path, Path]:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config = tmp_dir / "alertmanager.yml"
    config.write_text(text)
    return config, tmp_dir / "alertmanager.log"


async def _ready(am: Alertmanager, timeout: float) -> bool:
    """Wait for `/-/ready`; False if the process exited first or `timeout` passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while am.process.returncode is None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with am.session.get(f"{am.url}/-/ready") as r:
                        if r.status == 200:
                            return True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.02):
                        await am.process.wait()
    return False


async def _stop(am: Alertmanager) -> None:
    await am.session.close()
    if am.process.returncode is None:
        am.process.terminate()
        try:
            async with asyncio.timeout(5):
                await am.process.wait()
        except TimeoutError:
            am.process.kill()
            await am.process.wait()


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[Alertmanager]:
    """A real Alertmanager for one test."""
    async with running_alertmanager(tmp_path / "alertmanager") as am:
        yield am
