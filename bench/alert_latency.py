"""Alert latency: QEMU's event timestamp -> the webhook receiver, over real parts.

A real QEMU (qmpwatch.lab), the real daemon (`python -m qmpwatch run`, a subprocess) with one
`[[alert.webhook]]`, and an aiohttp receiver in this process. Each trial pauses the VM with
`stop` (a `vm_stopped_unexpected` alert: the daemon must classify the STOP with
`query-status` first) and resumes it once the alert arrived. Latency = arrival time at the
receiver - QEMU's timestamp of the STOP (both the host's realtime clock).

    python -m bench.alert_latency [--trials 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiohttp import web

from qmpwatch.lab import LabSpec, LabVM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _measure(trials: int, workdir: Path) -> list[float]:
    arrivals: asyncio.Queue[tuple[float, dict[str, object]]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        arrived = time.time()
        await arrivals.put((arrived, orjson.loads(await request.read())))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    latencies: list[float] = []
    try:
        async with LabVM.start(LabSpec(name="lat01"), workdir) as vm:
            cfg = workdir / "c.toml"
            cfg.write_text(
                f'[daemon]\nstate_dir = "{workdir / "state"}"\nmetrics_listen = ""\n'
                'api_socket = ""\n'
                f'[[vm]]\nname = "lat01"\nsocket = "{vm.watch_socket}"\n'
                f'[[alert.webhook]]\nurl = "http://127.0.0.1:{port}/hook"\n'
            )
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg),
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                for _ in range(trials):
                    mark = vm.mark()
                    await vm.stop()
                    stop = await vm.wait_event("STOP", after=mark)
                    while True:
                        arrived, payload = await asyncio.wait_for(arrivals.get(), 10)
                        if payload["status"] == "firing":
                            break
                    latencies.append(arrived - stop.qemu_time)
                    await vm.cont()
                    while True:  # the resolution, so the next stop is a new alert
                        _, payload = await asyncio.wait_for(arrivals.get(), 10)
                        if payload["status"] == "resolved":
                            break
            finally:
                daemon.terminate()
                await daemon.wait()
    finally:
        await runner.cleanup()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qw-lat-", dir="/tmp"))
    try:
        latencies = sorted(asyncio.run(_measure(args.trials, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(
        f"alert latency, QEMU STOP timestamp -> webhook receiver, {len(latencies)} alerts "
        f"(host {os.uname().nodename}, {os.cpu_count()} CPUs): "
        f"median {statistics.median(latencies) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, "
        f"max {latencies[-1] * 1000:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
