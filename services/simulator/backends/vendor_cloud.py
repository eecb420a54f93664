"""A simulated vendor cloud (see :mod:`dercmd.protocols.vendor_cloud`) in front of the fleet's
``vendor-cloud`` devices: it checks the token, answers every command of a batch at once,
records what each device received, has the measuring devices hold the limits they were given,
and reports the devices' results to the caller's ``responseUrl`` ``confirm_delay_s`` after the
batch arrived, grouped into few POSTs. It answers what became of a command
(``commands:status``) and serves measurement reports (:class:`~..backend.SimBackend`).

Every known device accepts and succeeds, except that a device refuses a command for an asset
it does not have (409). Fault injection (:class:`ResultFaults`, ``PUT /sim/vendor-cloud/faults``):
results held back (``PENDING`` until released, then reported at once) or lost (decided, so
``commands:status`` knows them, but never POSTed). A POST of results that fails is retried
once, then counted in ``CALLBACK_ERRORS`` and logged: the results are lost, as they can be
with a real vendor. The per-device fault plans (:mod:`..faults`, ``PUT /sim/faults``) apply
too: a whole call late, refused with 429 and ``Retry-After``, hanging or dropped after the
devices acted; one command refused with 503 before its device acted, or its result lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.vendor_cloud import (
    MAX_RESULTS_PER_POST,
    VendorBatch,
    VendorBatchAnswer,
    VendorCloudSettings,
)

from .. import metrics
from ..backend import SimBackend, dumps
from ..faults import FaultKind, Faults
from ..recorder import Recorder
from ..registry import SimContext, simulates

log = logging.getLogger(__name__)

BACKEND = "vendor-cloud"
#: Pauses before the retries of a POST of results that failed (no answer, 5xx, 429), as webhook
#: senders retry: quickly first, then backing off, for about a minute in all (each pause
#: jittered by up to a half). A receiver that is back within that has every result.
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
_JSON = {"Content-Type": "application/json"}


@dataclass
class ResultFaults:
    hold_results: bool = False  # results wait (PENDING) until released
    lose_results: bool = False  # results are decided but their POST never leaves


class FaultsBody(BaseModel):
    """``PUT /sim/vendor-cloud/faults``: what to change; a field left out stays as it is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    hold_results: bool | None = None
    lose_results: bool | None = None


class VendorCloudSim(SimBackend):
    name = BACKEND

    def __init__(
        self,
        fleet: Fleet,
        recorder: Recorder,
        token: str,
        confirm_delay_s: float,
        *,
        report_interval_s: float = 0.0,
        callback_transport: httpx.AsyncBaseTransport | None = None,
        faults: Faults | None = None,
    ) -> None:
        super().__init__(fleet, recorder, token, report_interval_s, transport=callback_transport, faults=faults)
        self._confirm_delay_s = confirm_delay_s
        self.results = ResultFaults()
        # Request ids: unique per simulator run without a random draw per command.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._request_numbers = itertools.count(1)
        # Results waiting to be reported: (due on the loop's clock, tie-breaker, responseUrl,
        # the results of one batch). One entry per batch, not per command.
        self._due: list[tuple[float, int, str, list[dict[str, Any]]]] = []
        self._held: list[tuple[str, list[dict[str, Any]]]] = []
        #: Per accepted command, when its result is decided (loop clock; inf while held back);
        #: kept as long as the simulator runs, like the receipts.
        self._decided_at: dict[str, float] = {}
        self._sequence = itertools.count()
        self._wake = asyncio.Event()  # set when an entry is due earlier than all others
        self._flusher: asyncio.Task[None] | None = None
        self._posts: set[asyncio.Task[None]] = set()
        self.serve_commands(VendorBatchAnswer, "Send up to 1000 commands (body: VendorBatch)",
                            "What became of up to 1000 commands (body: StatusQuery)")
        api = self.router  # /vendor-cloud/v1
        self.router = APIRouter()
        self.router.include_router(api)
        self.router.add_api_route("/sim/vendor-cloud/faults", self.put_result_faults, methods=["PUT"], response_model=None,
                                  tags=["sim"], summary="Hold back or lose the vendor cloud's results")

    async def aclose(self) -> None:
        tasks = [t for t in (self._flusher, *self._posts) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().aclose()

    async def commands_batch(self, request: Request) -> Response:
        """Answers and results are plain dicts in the wire shape of VendorItemResult and
        VendorResult: a pydantic model per item would cost several us per command at
        thousands of commands/s (tests read them back through those models)."""
        call = await self.batch_call(request, VendorBatch)
        if isinstance(call, Response):
            return call
        batch = call.batch
        received_at = utcnow()
        answers: list[dict[str, Any]] = []
        reports: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []
        for command in batch.commands:
            taken = self.take(command, call.faulty)
            if isinstance(taken, dict):
                answers.append(taken)
                continue
            entity, fault = taken
            state = self.states.get(command.device_id)  # measuring devices only (none in an EV fleet)
            if state is not None:
                refusal = state.refusal(command.assets, None, received_at)
                if refusal:
                    answers.append({"commandId": command.command_id, "status": 409, "message": refusal})
                    continue
                state.apply(command.type, command.value, command.percentage, command.assets)
            request_id = f"{self._id_prefix}-{next(self._request_numbers)}"
            self.recorder.record(entity.id, BACKEND, command.command_id, command.type, command.value, received_at,
                                 percentage=command.percentage, assets=command.assets, revert_of=command.revert_of)
            answers.append({"commandId": command.command_id, "status": 202, "requestId": request_id})
            (lost if fault is not None and fault.kind is FaultKind.LOSE_CALLBACK else reports).append({
                "requestId": request_id,
                "commandId": command.command_id,
                "deviceId": command.device_id,
                "result": "SUCCEEDED",
                "responseToken": command.response_token,
            })
        self.received.inc(len(reports) + len(lost))
        if lost:  # decided (commands:status knows them), never reported
            self._decide(lost, asyncio.get_running_loop().time() + self._confirm_delay_s)
        if reports:
            if self.results.hold_results:
                self._held.append((batch.response_url, reports))
                self._decide(reports, math.inf)
            else:
                self._schedule(batch.response_url, reports, self._confirm_delay_s)
        return await self.answer_batch(request, call, answers)

    def command_statuses(self, command_ids: Sequence[str]) -> list[str]:
        now = asyncio.get_running_loop().time()
        statuses = []
        for command_id in command_ids:
            decided_at = self._decided_at.get(command_id)
            statuses.append("UNKNOWN" if decided_at is None else "SUCCEEDED" if decided_at <= now else "PENDING")
        return statuses

    async def put_result_faults(self, body: FaultsBody) -> Any:
        """Hold the vendor cloud's results back (``commands:status`` says PENDING; setting it
        false again reports them at once) or lose them (decided, never POSTed)."""
        if body.lose_results is not None:
            self.results.lose_results = body.lose_results
        if body.hold_results is True:
            self.results.hold_results = True
        elif body.hold_results is False:
            self.release_results()
        return {"holdResults": self.results.hold_results, "loseResults": self.results.lose_results}

    def release_results(self) -> None:
        """Stop holding results back; those held are reported now."""
        self.results.hold_results = False
        held, self._held = self._held, []
        for url, results in held:
            self._schedule(url, results, 0.0)

    def _decide(self, results: list[dict[str, Any]], at: float) -> None:
        for result in results:
            self._decided_at[result["commandId"]] = at

    def _schedule(self, url: str, results: list[dict[str, Any]], delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay_s  # the devices carrying the commands out
        self._decide(results, due)
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
            if self.results.lose_results:
                log.info("results lost (fault injected)", extra={"results": sum(map(len, by_url.values()))})
                continue
            for url, results in by_url.items():
                for start in range(0, len(results), MAX_RESULTS_PER_POST):
                    task = loop.create_task(self._deliver(url, results[start : start + MAX_RESULTS_PER_POST]))
                    self._posts.add(task)
                    task.add_done_callback(self._posts.discard)

    async def _deliver(self, url: str, results: list[dict[str, Any]]) -> None:
        body = dumps({"results": results})
        error, retriable = await self._post(url, body)
        for pause in RETRY_DELAYS_S:
            if not (error and retriable):
                break
            await asyncio.sleep(pause * random.uniform(1.0, 1.5))
            error, retriable = await self._post(url, body)
        if error:
            metrics.CALLBACK_ERRORS.inc(len(results))
            log.warning(
                "results not delivered",
                extra={"url": url, "error": error, "command_ids": [r["commandId"] for r in results]},
            )

    async def _post(self, url: str, body: str) -> tuple[str | None, bool]:
        """POST once: (what went wrong or None, whether trying again may help)."""
        try:
            response = await self.http.post(url, content=body, headers=_JSON)
        except httpx.InvalidURL as exc:  # the caller's responseUrl: asking again will not help
            return repr(exc), False
        except httpx.HTTPError as exc:
            return repr(exc), True
        if response.is_success:
            return None, False
        return f"HTTP {response.status_code}: {response.text[:300]}", response.status_code >= 500 or response.status_code == 429


@simulates(BACKEND)
def _create(context: SimContext) -> VendorCloudSim:
    settings = context.settings
    return VendorCloudSim(
        context.fleet, context.recorder, VendorCloudSettings().token, settings.sim_confirm_delay_ms / 1000,
        report_interval_s=settings.sim_report_interval_s, callback_transport=context.transport, faults=context.faults,
    )
