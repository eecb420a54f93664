"""Group commit: concurrent callers share one flush of their work (a ledger transaction, a
produce request), so that under load one round trip carries what arrived meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Concurrent callers share one flush: while a flush runs, new items queue, and the next
    flush takes all of them (up to ``max_items``). No added wait when idle; under load each
    flush carries what arrived during the previous one. ``flush`` returns one result per item;
    if it raises, every caller of that flush gets the exception."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[Sequence[R]]], max_items: int) -> None:
        self._flush = flush
        self._max_items = max_items
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_items], self._queue[self._max_items :]
            try:
                results = await self._flush([item for item, _ in batch])
            except BaseException as exc:  # cancelled too: no caller may wait forever
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("stopping"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
