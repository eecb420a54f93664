"""Event contracts: one versioned pydantic model per topic.

On the wire an event is its model's JSON (camelCase field names) as the Kafka value, the
entity id as the key (the command id on ``dercmd.commands.state``), and CloudEvents
binary-mode headers (``ce_specversion``, ``ce_id``, ``ce_type``, ``ce_source``, ``ce_time``,
``content-type``). ``ce_type`` carries the model's version, e.g. ``dercmd.command.accepted.v1``;
a breaking change to a model is a new class with a new ``CE_TYPE``, never an edit in place.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class CommandType(StrEnum):
    START_CHARGING = "StartCharging"
    STOP_CHARGING = "StopCharging"
    RESET = "Reset"
    DISCONNECT = "Disconnect"
    LIMIT_FEED_IN = "LimitFeedIn"
    STOP_FEED_IN = "StopFeedIn"
    #: The batch API's ``limitProductionPower`` (BRIEF 2.2): production limited to
    #: ``percentage`` of nominal power, usually for a window (``startAt`` .. ``endAt``).
    LIMIT_PRODUCTION_POWER = "LimitProductionPower"


#: Types whose ``value`` is required (an integer >= 0); every other type takes no value.
VALUED_TYPES: frozenset[CommandType] = frozenset({CommandType.LIMIT_FEED_IN})
#: Types whose ``percentage`` (an integer 0..100) is required; no other type takes one.
PERCENTAGE_TYPES: frozenset[CommandType] = frozenset({CommandType.LIMIT_PRODUCTION_POWER})
#: Types that may hold a window (``endAt``): at its end the device returns to its default,
#: which is this type at 100 % (BRIEF 3, rule 5).
WINDOWED_TYPES: frozenset[CommandType] = PERCENTAGE_TYPES
#: The percentage of a device at its default (no limit).
DEFAULT_PERCENTAGE = 100


class CommandStatus(StrEnum):
    PENDING = "Pending"
    TRIGGERED = "Triggered"
    SENT = "Sent"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"
    REJECTED = "Rejected"

    @property
    def rank(self) -> int:
        """Position in the one-way state machine: a command only ever moves to a higher rank."""
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self.rank == _TERMINAL_RANK


_TERMINAL_RANK = 3
_RANK = {
    CommandStatus.PENDING: 0,
    CommandStatus.TRIGGERED: 1,
    CommandStatus.SENT: 2,
    CommandStatus.SUCCEEDED: _TERMINAL_RANK,
    CommandStatus.FAILED: _TERMINAL_RANK,
    CommandStatus.CANCELED: _TERMINAL_RANK,
    CommandStatus.REJECTED: _TERMINAL_RANK,
}


class Model(BaseModel):
    """Base of every wire model: camelCase JSON, snake_case Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Event(Model):
    """A model that travels on a topic. Subclasses set ``CE_TYPE`` (versioned)."""

    CE_TYPE: ClassVar[str]

    def ce_id(self) -> str:
        """The CloudEvents id: the same for a re-emitted copy of one event, so consumers may
        drop duplicates by (``ce_source``, ``ce_id``) as the CloudEvents spec allows."""
        return new_id()


#: Ids a caller may choose: safe in URLs, headers and keys.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
_REVERT_NAMESPACE = uuid.UUID("0b6e1f3a-52c4-4d0e-9a51-7c1f4e2d8b90")
#: Reverts' ids end so; callers may not choose such an id.
REVERT_SUFFIX = ":revert"


def revert_id(command_id: str) -> str:
    """The id of the revert that ends a command's window: ``<id>:revert`` (a UUID derived
    from the id when that would be longer than an id may be). The same for every replica
    and every retry, so a revert is dispatched at most once."""
    readable = f"{command_id}{REVERT_SUFFIX}"
    return readable if len(readable) <= 64 else str(uuid.uuid5(_REVERT_NAMESPACE, command_id))
MAX_VALUE = 2**31 - 1


def _time_as_text(value: Any) -> Any:
    """A time in a request is an ISO 8601 string: a number (lax pydantic would read it as
    seconds since 1970) or a bool is refused. Models built in code pass datetimes."""
    if isinstance(value, (int, float, bool)) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("a time is an ISO 8601 string with a time zone, e.g. 2026-06-01T12:00:00Z")
    return value


_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def _representable(value: datetime) -> datetime:
    """Within 1970..9998 in UTC, so it converts, compares and is stored anywhere (year 1 at
    +01:00 has no UTC time at all)."""
    try:
        year = value.astimezone(UTC).year if value.tzinfo is not None else value.year
    except OverflowError:
        year = 0
    if not 1970 <= year <= 9998:
        raise ValueError("a time must fall within the years 1970..9998")
    return value


#: A time as callers send it (REST bodies and queries, Kafka requests): an ISO 8601 string,
#: within 1970..9998.
RequestTime = Annotated[datetime, BeforeValidator(_time_as_text), AfterValidator(_representable)]

_DIGITS = re.compile(r"[0-9]{1,10}")


def _value_as_digits(value: Any) -> Any:
    """The Commands API documents ``value`` as a string: ``"3000"`` (decimal digits only, at
    most 10) is read as 3000. Any other string (``"3.5"``, ``"-1"``, ``" 3000"``, ``"abc"``) is
    refused; a number must be an integer (strict: ``true`` and ``3000.0`` are refused)."""
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError("value must be an integer, or a string of decimal digits (e.g. \"3000\")")
        return int(value)
    return value


#: ``value`` as callers send it (REST bodies, Kafka requests): an integer 0..2^31-1, or a
#: string of decimal digits holding one (the Commands API's documented form).
RequestValue = Annotated[
    int,
    BeforeValidator(_value_as_digits),
    Field(ge=0, le=MAX_VALUE, strict=True),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_VALUE},
                              {"type": "string", "pattern": "^[0-9]{1,10}$"}]}),
]


class CommandFields(Model):
    """What the caller asks for; shared by the request, REST body and accepted event. Numbers
    are strict: ``true`` and ``3000.0`` are not integers (requests take ``value`` also as a
    string of digits, :data:`RequestValue`; ``percentage`` is an integer only)."""

    type: CommandType
    value: int | None = Field(None, le=MAX_VALUE, strict=True)
    percentage: int | None = Field(None, ge=0, le=100, strict=True)

    @model_validator(mode="after")
    def _value_matches_type(self) -> CommandFields:
        if self.type in VALUED_TYPES:
            if self.value is None:
                raise ValueError(f"{self.type} requires an integer value >= 0 (watts)")
            if self.value < 0:
                raise ValueError("value must be >= 0")
        elif self.value is not None:
            raise ValueError(f"{self.type} takes no value")
        if self.type in PERCENTAGE_TYPES:
            if self.percentage is None:
                raise ValueError(f"{self.type} requires an integer percentage 0..100")
        elif self.percentage is not None:
            raise ValueError(f"{self.type} takes no percentage")
        return self


class PlainCommand(Model):
    """A command that takes neither ``value`` nor ``percentage``: one of the REST API's shapes
    (the API's bodies are a union of these, told apart by ``type``, so its OpenAPI document
    says exactly which types take what)."""

    type: Literal["StartCharging", "StopCharging", "Reset", "Disconnect", "StopFeedIn"]

    def fields(self) -> CommandFields:
        return CommandFields(type=CommandType(self.type))


class ValueCommand(Model):
    """A command with a ``value`` in watts (``LimitFeedIn``)."""

    type: Literal["LimitFeedIn"]
    value: RequestValue = Field(description='watts: an integer, or a string of decimal digits ("3000", as the Commands API documents it)')

    def fields(self) -> CommandFields:
        return CommandFields(type=CommandType(self.type), value=self.value)


class PercentageCommand(Model):
    """A command with a ``percentage`` of nominal power (``LimitProductionPower``)."""

    type: Literal["LimitProductionPower"]
    percentage: int = Field(ge=0, le=100, strict=True, description="an integer 0..100")

    def fields(self) -> CommandFields:
        return CommandFields(type=CommandType(self.type), percentage=self.percentage)


def shape_types(shape: type[Model]) -> frozenset[CommandType]:
    """The types a shape takes (tests check that the shapes say what CommandFields checks)."""
    return frozenset(CommandType(t) for t in shape.model_fields["type"].annotation.__args__)  # type: ignore[union-attr]


class CommandRequestV1(CommandFields, Event):
    """``dercmd.commands.requests``: a command produced onto Kafka by a caller.

    ``id`` is optional (letters, digits and ``._:-``, at most 64); without it the command id
    is the event's ``ce_id`` header (or, if that is not such an id, a UUID derived from it),
    and without that one derived from the record's topic position, so a redelivered request
    always maps to the same command.
    """

    CE_TYPE: ClassVar[str] = "dercmd.command.request.v1"

    id: str | None = Field(None, pattern=ID_PATTERN)
    entity_id: str = Field(min_length=1, max_length=128)
    #: As REST takes it: an integer, or a string of decimal digits (``"3000"``).
    value: RequestValue | None = None
    ignore_cooldown: bool = Field(False, strict=True)
    #: A scheduled or windowed command: the same rules as ``POST /v1/command/`` (BRIEF 2.2).
    start_at: RequestTime | None = None
    end_at: RequestTime | None = None
    asset_identifiers: tuple[str, ...] | None = None
    #: The caller's deadline: not delivered by then, the command ends ``Failed: expired``.
    expires_at: RequestTime | None = None


class CommandAcceptedV1(CommandFields, Event):
    """``dercmd.commands.accepted`` (internal): validated, authorised, in the ledger as Pending."""

    CE_TYPE: ClassVar[str] = "dercmd.command.accepted.v1"

    id: str
    entity_id: str
    ignore_cooldown: bool = False
    #: When to start; None for an immediate command ("now" by arbitration's clock, so a
    #: few seconds of skew between hosts can never turn it into a scheduled one).
    trigger_time: datetime | None = None
    #: End of the command's window: then the device returns to its default (None: holds
    #: until replaced).
    end_at: datetime | None = None
    asset_identifiers: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    accepted_at: datetime
    source: str
    #: Announced again by the status service's recovery (rebuilt from the ledger), not by
    #: intake: it may have reached its device already.
    recovered: bool = False

    def ce_id(self) -> str:
        return self.id


class CommandCancelV1(Event):
    """``dercmd.commands.accepted`` too (so it is arbitrated in order with the entity's
    commands): end a command. ``reason`` is ``canceled`` (a caller's DELETE; ``by`` says who)
    or ``expired`` (its deadline passed: the sweeper of the status service)."""

    CE_TYPE: ClassVar[str] = "dercmd.command.cancel.v1"

    command_id: str
    entity_id: str
    reason: str
    by: str | None = None
    detail: str | None = None
    #: Also end it while it waits in the scheduled slot (a caller's cancel, its expiresAt);
    #: a stage deadline leaves a scheduled command to the due-index.
    include_scheduled: bool = True
    at: datetime

    def ce_id(self) -> str:
        return f"{self.command_id}/cancel/{self.reason}"


class DispatchOrderV1(CommandFields, Event):
    """``dercmd.dispatch.orders`` (internal): arbitration's instruction to deliver now.

    ``fence`` is the entity's fencing token after the slot change that produced the order;
    dispatch refuses an order whose fence is older than the entity's current one.
    """

    CE_TYPE: ClassVar[str] = "dercmd.dispatch.order.v1"

    command_id: str
    entity_id: str
    fence: int
    accepted_at: datetime
    ordered_at: datetime
    #: The window, for a backend that keeps windows natively (others get the revert as an
    #: order of its own at ``end_at``).
    start_at: datetime | None = None
    end_at: datetime | None = None
    asset_identifiers: tuple[str, ...] | None = None
    #: Set on a revert: the command whose window ended; the device returns to its default.
    revert_of: str | None = None
    #: Not to be sent before this time: arbitration acts on due starts and ends a little
    #: ahead (``DERCMD_DUE_LEAD_MS``) so the order waits at dispatch, not in the pipeline.
    not_before: datetime | None = None
    #: The caller's deadline: no backend call is made after it; the command ends
    #: ``Failed: expired`` instead.
    expires_at: datetime | None = None
    #: Ordered for a command announced again by recovery: where dispatch has no record of it
    #: (Redis lost it), the backend is asked whether it has it before it is sent.
    recovered: bool = False

    def ce_id(self) -> str:
        return f"{self.command_id}/{self.fence}"


class DeliveryCheckV1(Event):
    """``dercmd.dispatch.orders`` too: a command that has been ``Sent`` past its deadline
    without a result (the status service's sweeper). dispatch asks the backend for the
    outcome where it can, else ends it ``Failed: no_confirmation``."""

    CE_TYPE: ClassVar[str] = "dercmd.dispatch.check.v1"

    command_id: str
    entity_id: str
    at: datetime

    def ce_id(self) -> str:
        return f"{self.command_id}/check/{int(self.at.timestamp())}"


class StatusEventV1(Event):
    """``dercmd.commands.status``: one transition of one command (every transition)."""

    CE_TYPE: ClassVar[str] = "dercmd.command.status.v1"

    #: Unique per transition. Defaults to ``<command id>/<status>``: a command enters each
    #: status at most once, so a re-emitted transition (after a crash or redelivery) has the
    #: same id and consumers drop it.
    event_id: str = ""
    command_id: str
    entity_id: str
    status: CommandStatus
    at: datetime = Field(default_factory=utcnow)
    reason: str | None = None
    detail: str | None = None
    cooldown_until: datetime | None = None
    fence: int | None = None
    superseded_by: str | None = None
    # Set on Pending (and on Rejected when readable) so a consumer can show the command.
    type: CommandType | None = None
    value: int | None = None
    percentage: int | None = None
    trigger_time: datetime | None = None
    end_at: datetime | None = None
    asset_identifiers: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    source: str | None = None
    #: A revert (the first event of one; it is a command of its own): the command whose
    #: window ended.
    revert_of: str | None = None

    def ce_id(self) -> str:
        return self.event_id

    @model_validator(mode="before")
    @classmethod
    def _default_event_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not (data.get("event_id") or data.get("eventId")):
            command_id = data.get("command_id") or data.get("commandId")
            status = data.get("status")
            data = {**data, "event_id": f"{command_id}/{CommandStatus(status).value}"}
        return data


class CommandStateV1(Event):
    """``dercmd.commands.state`` (compacted, keyed by command id): the latest state of a command."""

    CE_TYPE: ClassVar[str] = "dercmd.command.state.v1"

    id: str
    entity_id: str
    status: CommandStatus
    type: CommandType | None = None
    value: int | None = None
    percentage: int | None = None
    trigger_time: datetime | None = None
    #: A windowed command's window: ``start_at`` is its ``trigger_time``, filled in here.
    start_at: datetime | None = None
    end_at: datetime | None = None
    asset_identifiers: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    revert_of: str | None = None
    reason: str | None = None
    detail: str | None = None
    cooldown_until: datetime | None = None
    superseded_by: str | None = None
    source: str | None = None
    ignore_cooldown: bool = False
    created_at: datetime
    updated_at: datetime
    accepted_at: datetime | None = None
    triggered_at: datetime | None = None
    sent_at: datetime | None = None
    confirmed_at: datetime | None = None

    def ce_id(self) -> str:
        return f"{self.id}/{self.status.value}"

    @model_validator(mode="before")
    @classmethod
    def _window_start(cls, data: Any) -> Any:
        """A window shows as ``startAt`` .. ``endAt``; other commands have ``triggerTime`` only."""
        if isinstance(data, dict) and data.get("end_at", data.get("endAt")) is not None:
            if data.get("start_at", data.get("startAt")) is None:
                data = {**data, "start_at": data.get("trigger_time", data.get("triggerTime"))}
        return data


class DeviceReportV1(Event):
    """``dercmd.devices.reports``: a measurement report a device backend sent on request."""

    CE_TYPE: ClassVar[str] = "dercmd.device.report.v1"

    entity_id: str
    at: datetime
    measurements: dict[str, Any]
    command_id: str | None = None


def dump(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True, exclude_none=True).encode()
