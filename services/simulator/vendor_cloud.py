"""A simulated vendor cloud (see :mod:`dercmd.protocols.vendor_cloud`) in front of the fleet's
``vendor-cloud`` devices: it checks the token, answers every command of a batch at once,
records what each device received, and reports the devices' results to the caller's
``responseUrl`` ``confirm_delay_s`` after the batch arrived, grouped into few POSTs.

Every known device accepts and succeeds: nothing here answers 409 or FAILED yet (that is for
fault injection). A POST of results that fails is retried once, then counted in
``CALLBACK_ERRORS`` and logged: the results are lost, as they can be with a real vendor.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import uuid
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.vendor_cloud import MAX_RESULTS_PER_POST, VendorBatch, VendorBatchAnswer

from . import metrics
from .recorder import Recorder

log = logging.getLogger(__name__)

BACKEND = "vendor-cloud"
RETRY_DELAY_S = 0.2  # before the one retry of a failed POST of results
_JSON = {"Content-Type": "application/json"}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_response(body: str | bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


class VendorCloudSim:
    def __init__(
        self,
        fleet: Fleet,
        recorder: Recorder,
        token: str,
        confirm_delay_s: float,
        *,
        callback_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._devices = {e.device_id: e for e in fleet.entities.values() if e.backend == BACKEND}
        self._recorder = recorder
        self._authorization = f"Bearer {token}"
        self._confirm_delay_s = confirm_delay_s
        self._received = metrics.RECEIVED.labels(BACKEND)
        self._http = httpx.AsyncClient(
            timeout=5.0,
            transport=callback_transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        # Request ids: unique per simulator run without a random draw per command.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._request_numbers = itertools.count(1)
        # Results waiting to be reported: (due on the loop's clock, tie-breaker, responseUrl,
        # the results of one batch). One entry per batch, not per command.
        self._due: list[tuple[float, int, str, list[dict[str, Any]]]] = []
        self._sequence = itertools.count()
        self._wake = asyncio.Event()  # set when an entry is due earlier than all others
        self._flusher: asyncio.Task[None] | None = None
        self._posts: set[asyncio.Task[None]] = set()
        self.router = APIRouter(prefix="/vendor-cloud/v1", tags=["vendor-cloud"])
        self.router.add_api_route(
            "/commands:batch",
            self.commands_batch,
            methods=["POST"],
            response_model=None,
            responses={200: {"model": VendorBatchAnswer}, 400: {}, 401: {}},
            summary="Send up to 1000 commands (body: VendorBatch)",
            description="The vendor-cloud bulk endpoint; the protocol is described in `dercmd.protocols.vendor_cloud`.",
        )

    async def aclose(self) -> None:
        tasks = [t for t in (self._flusher, *self._posts) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    async def commands_batch(self, request: Request) -> Response:
        """The body is validated here rather than by FastAPI, so a malformed batch is a 400 as
        the protocol says. Answers and results are plain dicts in the wire shape of
        VendorItemResult and VendorResult: a pydantic model per item would cost several us per
        command at thousands of commands/s (tests read them back through those models)."""
        if request.headers.get("authorization") != self._authorization:
            return _json_response(_dumps({"message": "invalid token"}), 401)
        try:
            batch = VendorBatch.model_validate_json(await request.body())
        except ValidationError as exc:
            return _json_response(_dumps({"message": f"malformed batch: {str(exc)[:2000]}"}), 400)
        received_at = utcnow()
        answers: list[dict[str, Any]] = []
        reports: list[dict[str, Any]] = []
        for command in batch.commands:
            entity = self._devices.get(command.device_id)
            if entity is None:
                answers.append({"commandId": command.command_id, "status": 404, "message": f"unknown device {command.device_id}"})
                continue
            request_id = f"{self._id_prefix}-{next(self._request_numbers)}"
            self._recorder.record(entity.id, BACKEND, command.command_id, command.type, command.value, received_at)
            answers.append({"commandId": command.command_id, "status": 202, "requestId": request_id})
            reports.append({
                "requestId": request_id,
                "commandId": command.command_id,
                "deviceId": command.device_id,
                "result": "SUCCEEDED",
                "responseToken": command.response_token,
            })
        if reports:
            self._received.inc(len(reports))
            self._schedule(batch.response_url, reports)
        return _json_response(_dumps({"results": answers}))

    def _schedule(self, url: str, results: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._confirm_delay_s  # the devices carrying the commands out
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_forever(), name="vendor-cloud-results")
        if not self._due or due < self._due[0][0]:
            self._wake.set()
        heapq.heappush(self._due, (due, next(self._sequence), url, results))

    async def _flush_forever(self) -> None:
        """The one task that reports results: it sleeps until the earliest is due, then sends
        everything due by then, one POST per responseUrl and 500 results."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._due:
                await self._wake.wait()
                continue
            if self._due[0][0] > loop.time():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._due[0][0]):
                        await self._wake.wait()
                continue
            now = loop.time()
            by_url: dict[str, list[dict[str, Any]]] = {}
            while self._due and self._due[0][0] <= now:
                _, _, url, results = heapq.heappop(self._due)
                by_url.setdefault(url, []).extend(results)
            for url, results in by_url.items():
                for start in range(0, len(results), MAX_RESULTS_PER_POST):
                    task = loop.create_task(self._deliver(url, results[start : start + MAX_RESULTS_PER_POST]))
                    self._posts.add(task)
                    task.add_done_callback(self._posts.discard)

    async def _deliver(self, url: str, results: list[dict[str, Any]]) -> None:
        body = _dumps({"results": results})
        error, retriable = await self._post(url, body)
        if error and retriable:
            await asyncio.sleep(RETRY_DELAY_S)
            error, _ = await self._post(url, body)
        if error:
            metrics.CALLBACK_ERRORS.inc(len(results))
            log.warning(
                "results not delivered",
                extra={"url": url, "error": error, "command_ids": [r["commandId"] for r in results]},
            )

    async def _post(self, url: str, body: str) -> tuple[str | None, bool]:
        """POST once: (what went wrong or None, whether trying again may help)."""
        try:
            response = await self._http.post(url, content=body, headers=_JSON)
        except httpx.InvalidURL as exc:  # the caller's responseUrl: asking again will not help
            return repr(exc), False
        except httpx.HTTPError as exc:
            return repr(exc), True
        if response.is_success:
            return None, False
        return f"HTTP {response.status_code}: {response.text[:300]}", response.status_code >= 500 or response.status_code == 429
