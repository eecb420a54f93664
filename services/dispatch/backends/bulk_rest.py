"""What the backends on a bulk REST protocol (:mod:`dercmd.protocols.common`) share: the
client's errors translated at this edge into the three outcomes, and what every such protocol
offers the same way: what became of commands (``commands:status``) and measurement reports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from dercmd.fleet import Entity
from dercmd.protocols.common import MAX_REPORT_REQUEST, MAX_STATUS_QUERY, DeviceApiError, DeviceReport, JsonClient

from .base import BackendError, CommandOutcome, DeliveryUnknown, Finding, NotDelivered, Query, Refused


def translate(error: DeviceApiError) -> BackendError:
    if error.unknown:
        return DeliveryUnknown("delivery_unknown", str(error))
    if error.retriable:
        return NotDelivered("backend_unavailable", str(error), retry_after_s=error.retry_after_s)
    return Refused("backend_refused", str(error))


def item_error(status: int, message: str | None) -> BackendError:
    """One command of a bulk call that was not accepted: a per-item 429 or 5xx was not acted
    on (the protocols say so), anything else is a refusal."""
    detail = f"HTTP {status}: {message or ''}"
    if status == 429 or status >= 500:
        return NotDelivered("backend_unavailable", detail)
    return Refused("backend_refused", detail)


@contextmanager
def translated() -> Iterator[None]:
    """A whole call that failed, as the :class:`BackendError` dispatch decides from."""
    try:
        yield
    except DeviceApiError as exc:
        raise translate(exc) from exc


class BulkRestBackend:
    router = None

    def __init__(self, client: JsonClient) -> None:
        self._client = client

    async def start(self) -> None:
        pass

    async def outcomes(self, queries: Sequence[Query]) -> list[CommandOutcome]:
        out: list[CommandOutcome] = []
        with translated():
            for start in range(0, len(queries), MAX_STATUS_QUERY):
                ids = [q.command_id for q in queries[start : start + MAX_STATUS_QUERY]]
                out += [CommandOutcome(Finding(s.status), s.message) for s in await self._client.command_status(ids)]
        return out

    async def subscribe_reports(self, url: str, token: str) -> None:
        with translated():
            await self._client.subscribe_reports(url, token)

    async def request_reports(self, entities: Sequence[Entity]) -> list[DeviceReport]:
        reports: list[DeviceReport] = []
        with translated():
            for start in range(0, len(entities), MAX_REPORT_REQUEST):
                reports += await self._client.request_reports([e.device_id for e in entities[start : start + MAX_REPORT_REQUEST]])
        return reports

    async def aclose(self) -> None:
        await self._client.aclose()
