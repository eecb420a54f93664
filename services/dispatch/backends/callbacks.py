"""The route a backend's asynchronous results arrive at, for a backend whose results come in
batches, each carrying the token dispatch handed out with its command: the body read as the
backend's own model, each result authenticated by its token, the genuine ones reported through
the delivery state, and one answer per result (its delivery state, or ``invalid_signature``). Errors are in
the one envelope (:func:`dercmd.web.error`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from dercmd.web import error

from .base import BackendContext, DeviceResult

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class SignedResult:
    token: str
    command_id: str
    succeeded: bool
    message: str | None = None


def results_router(path: str, model: type[M], results: Callable[[M], Sequence[SignedResult]], context: BackendContext) -> APIRouter:
    router = APIRouter()

    @router.post(path, include_in_schema=False)
    async def take_results(request: Request) -> JSONResponse:
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as exc:
            return error("invalid_result", str(exc)[:2000], 400)
        signed = results(body)
        genuine: list[DeviceResult] = []
        answers: dict[int, str] = {}
        for i, result in enumerate(signed):
            entity_id = context.entity_of(result.token, result.command_id)
            if entity_id is None:
                answers[i] = "invalid_signature"
                continue
            genuine.append(DeviceResult(entity_id, result.command_id, result.succeeded, result.message))
        if not genuine:
            return error("invalid_signature", "no result carries a valid token", 403)
        states = iter(await context.report(genuine))
        out = [{"commandId": r.command_id, "state": answers.get(i) or next(states)} for i, r in enumerate(signed)]
        return JSONResponse({"results": out})

    return router
