"""How many commands/s the simulated vendor cloud sustains, and at what CPU.

Starts the simulator (``python -m dercmd.simulator``) as its own process with a generated fleet,
posts batches to ``/vendor-cloud/v1/commands:batch`` from here, and receives the results on a
minimal HTTP server in this process (so the receiver costs little). Two phases:

  paced  -- a target rate (default 5,000 commands/s) for --seconds: the simulator's CPU at that rate
  flood  -- --concurrency callers posting back to back: the most the simulator sustains

The simulator's CPU is read from /proc (user+system seconds over wall seconds; 1.0 = one core).

    .venv/bin/python tools/bench_vendor_cloud_sim.py [--devices 100000] [--batch 100] [--rate 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dercmd.launcher import free_ports

TOKEN = "bench-token"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class Receiver(asyncio.Protocol):
    """Just enough HTTP/1.1 to take keep-alive POSTs of results and count them."""

    results = 0
    posts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length_at = head.find(b"content-length:")
            length = int(head[length_at + 15 : head.find(b"\r\n", length_at) if head.find(b"\r\n", length_at) > 0 else None])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            Receiver.results += body.count(b'"commandId"')
            Receiver.posts += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")  # type: ignore[attr-defined]


def write_fleet(path: Path, devices: int) -> None:
    lines = ["entities:"] + [f"  d{i}: {{kind: EV, vendor: tesla, backend: vendor-cloud}}" for i in range(devices)]
    path.write_text("\n".join(lines) + "\ntokens: {}\n")


async def phase(name: str, http: httpx.AsyncClient, pid: int, args: argparse.Namespace, response_url: str, paced: bool) -> None:
    sent = accepted = 0
    number = 0
    deadline = time.monotonic() + args.seconds
    start_results = Receiver.results
    start_posts = Receiver.posts

    async def post_one() -> None:
        nonlocal sent, accepted, number
        number += 1
        base = number * args.batch
        commands = [
            {"deviceId": f"d{(base + i) % args.devices}", "commandId": f"{name}-{base + i}", "type": "StartCharging",
             "responseToken": "x" * 32}
            for i in range(args.batch)
        ]
        response = await http.post("/vendor-cloud/v1/commands:batch", content=json.dumps({"responseUrl": response_url, "commands": commands}))
        response.raise_for_status()
        sent += args.batch
        accepted += sum(1 for r in response.json()["results"] if r["status"] == 202)

    async def flood_worker() -> None:
        while time.monotonic() < deadline:
            await post_one()

    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    if paced:
        interval = args.batch / args.rate
        in_flight: set[asyncio.Task[None]] = set()
        next_at = t0
        while next_at < deadline:
            task = asyncio.create_task(post_one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*in_flight)
    else:
        await asyncio.gather(*(flood_worker() for _ in range(args.concurrency)))
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    # Let the last results arrive (confirm delay), then count what came back.
    end_wait = time.monotonic() + 5
    while Receiver.results - start_results < accepted and time.monotonic() < end_wait:
        await asyncio.sleep(0.01)
    results = Receiver.results - start_results
    posts = Receiver.posts - start_posts
    print(
        f"{name:6s} {sent / wall:8.0f} commands/s sent ({accepted} accepted in {wall:.1f} s), "
        f"simulator CPU {cpu / wall:.2f} core ({cpu / max(sent, 1) * 1e6:.0f} us/command), "
        f"{results} results back in {posts} POSTs ({results / max(posts, 1):.0f}/POST)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5000, help="paced phase, commands/s")
    parser.add_argument("--concurrency", type=int, default=4, help="flood phase, callers")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()

    sim_port, receiver_port = free_ports(2)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Receiver, "127.0.0.1", receiver_port)
    with tempfile.TemporaryDirectory() as work:
        fleet = Path(work) / "fleet.yaml"
        write_fleet(fleet, args.devices)
        env = {**os.environ, "DERCMD_FLEET_FILE": str(fleet), "DERCMD_SIMULATOR_PORT": str(sim_port),
               "DERCMD_VENDOR_CLOUD_TOKEN": TOKEN, "DERCMD_LOG_LEVEL": "WARNING"}
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "dercmd.simulator"], env=env)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{sim_port}", timeout=30,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            ) as http:
                while True:
                    try:
                        if (await http.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                print(f"simulator up in {time.monotonic() - started:.1f} s with {args.devices} devices")
                response_url = f"http://127.0.0.1:{receiver_port}/results"
                await phase("paced", http, process.pid, args, response_url, paced=True)
                await phase("flood", http, process.pid, args, response_url, paced=False)
        finally:
            process.terminate()
            process.wait(10)
            server.close()


if __name__ == "__main__":
    asyncio.run(main())
