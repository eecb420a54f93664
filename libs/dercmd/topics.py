"""Topic names and the event model each one carries. The README's topic table mirrors this."""

from __future__ import annotations

from dataclasses import dataclass

from . import events as ev


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    model: type[ev.Event]
    key: str  # what the record key is
    public: bool
    compacted: bool = False
    #: Further models the topic carries, told apart by the ``ce_type`` header.
    others: tuple[type[ev.Event], ...] = ()

    def model_of(self, ce_type: str | None) -> type[ev.Event]:
        for model in self.others:
            if model.CE_TYPE == ce_type:
                return model
        return self.model

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"


REQUESTS = Topic("dercmd.commands.requests", ev.CommandRequestV1, "entity id", public=True)
ACCEPTED = Topic("dercmd.commands.accepted", ev.CommandAcceptedV1, "entity id", public=False, others=(ev.CommandCancelV1,))
ORDERS = Topic("dercmd.dispatch.orders", ev.DispatchOrderV1, "entity id", public=False, others=(ev.DeliveryCheckV1,))
STATUS = Topic("dercmd.commands.status", ev.StatusEventV1, "entity id", public=True)
STATE = Topic("dercmd.commands.state", ev.CommandStateV1, "command id", public=True, compacted=True)
REPORTS = Topic("dercmd.devices.reports", ev.DeviceReportV1, "entity id", public=True)

ALL: tuple[Topic, ...] = (REQUESTS, ACCEPTED, ORDERS, STATUS, STATE, REPORTS)

#: Topics that a service consumes, and so may dead-letter into.
CONSUMED: tuple[Topic, ...] = (REQUESTS, ACCEPTED, ORDERS, STATUS)


def all_names() -> list[str]:
    return [t.name for t in ALL] + [t.dlq for t in CONSUMED]
