"""Stopping a service's tasks: a cancel that a library swallows is repeated until the task ends."""

from __future__ import annotations

import asyncio

from dercmd.service import cancel_all


async def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if swallowed < 3:  # as a shielded Redis command does
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all(task, None), 5)
    assert task.cancelled() and swallowed == 3
