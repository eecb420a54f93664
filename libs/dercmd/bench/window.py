"""The window phase: one curtailment window for many inverters through the batch API
(BRIEF 2.2: requests of 100 devices), and how late each device got its start and its revert.

The requests are posted (aiohttp, ``CONCURRENCY`` in flight) with ``startAt`` ``lead_s``
ahead, so every command is arbitrated and scheduled before its start; the figures are then
what the due-index, dispatch and the simulated vendor cloud add: device receipt minus
``startAt`` (p50 / p99 / max) and revert receipt minus ``endAt``. The simulator's receive
times and this process's clock are the same host's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from .fleetgen import TOKEN
from dercmd.events import revert_id

from .load import receipts, receipts_total
from .report import percentile

CONCURRENCY = 16
BATCH = 100


@dataclass
class WindowResult:
    devices: int
    post_seconds: float
    post_errors: dict[str, int] = field(default_factory=dict)
    started: int = 0
    reverted: int = 0
    start_lateness_s: dict[int, float | None] = field(default_factory=dict)
    start_lateness_max_s: float | None = None
    revert_lateness_s: dict[int, float | None] = field(default_factory=dict)
    early: int = 0  # starts received before startAt (must be 0)


async def _post_all(api_url: str, bodies: list[dict[str, Any]]) -> tuple[list[str], dict[str, int]]:
    ids: list[str] = []
    errors: dict[str, int] = {}
    queue = iter(bodies)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def worker() -> None:
            for body in queue:
                async with http.post(f"{api_url}/v1/command/", json=body) as response:
                    answer = await response.json()
                    if response.status == 201:
                        ids.extend(c["id"] for c in answer["commands"])
                    else:
                        key = answer.get("key") or str(response.status)
                        errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ids, errors


async def run(api_url: str, simulator_url: str, devices: list[str], lead_s: float, length_s: float,
              deadline_s: float) -> WindowResult:
    before = await receipts_total(simulator_url)
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    end = start + timedelta(seconds=length_s)
    bodies = [{"command": {"type": "limitProductionPower", "percentage": 30, "startAt": start.isoformat(),
                           "endAt": end.isoformat()}, "deviceHashIds": devices[i : i + BATCH]}
              for i in range(0, len(devices), BATCH)]
    posted = time.monotonic()
    ids, errors = await _post_all(api_url, bodies)
    result = WindowResult(len(devices), time.monotonic() - posted, errors)
    if time.monotonic() - posted > lead_s:
        print(f"bench: posting the window took longer than its lead ({lead_s:.0f} s): raise --window-lead", flush=True)
    wanted = set(ids)
    reverts = {revert_id(c) for c in ids}
    # Read the receipts once the window is over (reading while it starts would compete with
    # the stack for the CPU), then until every start and revert is in.
    await asyncio.sleep(max(0.0, end.timestamp() - time.time() + 1))
    got: dict[str, list[float]] = {}
    after = before
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + deadline_s
    while loop.time() < stop_at:
        page = await receipts(simulator_url, after=after)
        for command_id, times in page.items():
            got.setdefault(command_id, []).extend(times)
        after += sum(len(t) for t in page.values())
        if wanted <= got.keys() and reverts <= got.keys():
            break
        await asyncio.sleep(1)
    start_s, end_s = start.timestamp(), end.timestamp()
    starts = [min(got[c]) - start_s for c in ids if c in got]
    ends = [min(got[r]) - end_s for r in reverts if r in got]
    result.started, result.reverted = len(starts), len(ends)
    result.early = sum(1 for late in starts if late < 0)
    result.start_lateness_s = {p: percentile(starts, p) for p in (50, 99)}
    result.start_lateness_max_s = max(starts, default=None)
    result.revert_lateness_s = {p: percentile(ends, p) for p in (50, 99)}
    return result

