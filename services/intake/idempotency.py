"""Idempotency keys on every POST (the IETF httpapi ``Idempotency-Key`` header draft).

A POST that carries ``Idempotency-Key`` is answered once: the same key again, from the same
caller (bearer token) with the same request (method, path, query and body, the body compared
as JSON so spacing and key order do not matter), gets the first answer again (its status and
body, ``Idempotency-Replayed: true``) and creates nothing; the same key with another request is
refused (422 ``idempotency_key_reused``); while the first is still being answered, 409
``idempotency_key_in_use`` (``Retry-After``). Keys are kept ``DERCMD_IDEMPOTENCY_TTL_S``
(24 h) in Redis (:mod:`dercmd.state.idempotency`), so every intake replica sees them.

Only a success (2xx) is kept: an error answer created nothing, so the key is freed and a retry
with it is answered anew (a 409 ``cooldown_active`` is not replayed after the cooldown). A
request without the header costs nothing here: no Redis call.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import Response

from dercmd.state.idempotency import Answer, IdempotencyKeys, Outcome
from dercmd.web import ErrorBody

from . import metrics
from .admission import Refusal

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
MAX_LENGTH = 255
#: Headers of a kept answer that its replay repeats.
_REPLAYED_HEADERS = ("location",)

#: The route parameter: ``key: IdempotencyKeyHeader = None`` (None when absent; typed ``str`` so
#: the document says a string, not "string or null"). The length limits are documented here and
#: checked by :func:`checked_key`, so a malformed key gets its own error key.
IdempotencyKeyHeader = Annotated[str, Header(
    alias=HEADER,
    description=(
        "Optional (IETF httpapi `Idempotency-Key`): 1..255 characters, unique per request (a UUID), plain or as a "
        "quoted string. The same key again from the same token with the same request (path, query, body) answers "
        "the first answer again (`Idempotency-Replayed: true`) and creates nothing; with another request: 422 "
        "`idempotency_key_reused`; while the first is in progress: 409 `idempotency_key_in_use`. Kept 24 h "
        "(`DERCMD_IDEMPOTENCY_TTL_S`); an error answer is not kept. Malformed: 400 `invalid_idempotency_key`."
    ),
    json_schema_extra={"minLength": 1, "maxLength": MAX_LENGTH},
)]

#: The answers an idempotent POST adds, for the OpenAPI document.
RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {"headers": {REPLAYED: {"description": "`true`: the answer kept under this `Idempotency-Key`, given again; "
                                                "nothing was created now", "schema": {"type": "string", "enum": ["true"]}}}},
    422: {"model": ErrorBody, "description": "`idempotency_key_reused`: this `Idempotency-Key` was used for another request"},
}


def checked_key(raw: str) -> str:
    """The key of a header value: 1..255 printable ASCII characters, optionally in double
    quotes (the draft's structured-field string; ``"abc"`` and ``abc`` are one key)."""
    key = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if not 1 <= len(key) <= MAX_LENGTH or not key.isascii() or not key.isprintable():
        raise Refusal("invalid_idempotency_key", f"{HEADER} must be 1..{MAX_LENGTH} printable ASCII characters")
    return key


def scope_of(token: str) -> str:
    """Whose keys these are: a hash of the bearer token (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


async def fingerprint(request: Request) -> str:
    """What makes two requests the same: method, path, query and body (as JSON)."""
    body = await request.body()
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    query = "&".join(sorted(f"{k}={v}" for k, v in request.query_params.multi_items()))
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.url.path.encode(), query.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class Idempotency:
    def __init__(self, keys: IdempotencyKeys) -> None:
        self._keys = keys

    async def answer(self, request: Request, token: str, header: str | None, handle: Callable[[], Awaitable[Response]]) -> Response:
        """``handle()``'s answer, once per key (see the module); without a key, just that."""
        if header is None:
            return await handle()
        key = checked_key(header)
        scope = scope_of(token)
        fp = await fingerprint(request)
        begun = await self._keys.begin(scope, key, fp)
        if begun.outcome is Outcome.DONE:
            assert begun.answer is not None
            metrics.IDEMPOTENT_REPLAYS.inc()
            return Response(begun.answer.body, status_code=begun.answer.status, media_type="application/json",
                            headers={**begun.answer.headers, REPLAYED: "true"})
        if begun.outcome is Outcome.IN_PROGRESS:
            raise Refusal("idempotency_key_in_use", f"a request with this {HEADER} is still being answered; retry shortly",
                          status=409, headers={"Retry-After": "1"})
        if begun.outcome is Outcome.MISMATCH:
            raise Refusal("idempotency_key_reused", f"this {HEADER} was used for another request (path, query or body)",
                          status=422)
        try:
            response = await handle()
        except BaseException:
            await self._release(scope, key, fp, begun.owner)
            raise
        if 200 <= response.status_code < 300:
            headers = {name: response.headers[name] for name in _REPLAYED_HEADERS if name in response.headers}
            try:
                kept = await self._keys.finish(scope, key, fp, begun.owner, Answer(response.status_code, bytes(response.body), headers))
            except Exception as exc:  # the command exists: answer it; the key frees itself when its lease runs out
                log.warning("idempotency key not kept", extra={"error": repr(exc), "path": request.url.path})
            else:
                if not kept:
                    log.warning("idempotency key lost its lease before the answer", extra={"path": request.url.path})
        else:
            await self._release(scope, key, fp, begun.owner)
        return response

    async def _release(self, scope: str, key: str, fp: str, owner: str) -> None:
        try:
            await self._keys.release(scope, key, fp, owner)
        except Exception as exc:  # the key frees itself when its lease runs out
            log.warning("idempotency key not released", extra={"error": repr(exc)})
