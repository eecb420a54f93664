"""Commands are built here, and only here: from a REST entity command, a scheduled one, a
device of a batch (BRIEF 2.2) or a Kafka request. Each way in checks what it must and gets
the same :class:`~dercmd.events.CommandAcceptedV1`; a command that will not do raises a
:class:`Refusal` with a stable key."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from dercmd.events import REVERT_SUFFIX, WINDOWED_TYPES, CommandAcceptedV1, CommandFields, CommandType, new_id
from dercmd.fleet import Entity, Fleet

from .admission import Refusal

#: BRIEF 2.2: how far ahead a start may be, and how long a window may last (2^31 - 1 ms).
MAX_AHEAD = timedelta(milliseconds=2**31 - 1)


def check_supported(fleet: Fleet, entity: Entity, command_type: CommandType) -> None:
    if not fleet.supports(entity, command_type):
        raise Refusal(
            "command_not_supported",
            f"{command_type} is not supported by {entity.id} ({entity.kind}, {entity.vendor}, {entity.backend})",
        )


def check_aware(**times: datetime | None) -> None:
    for name, value in times.items():
        if value is not None and value.tzinfo is None:
            raise Refusal("validation_error", f"{name} needs a time zone (e.g. 2026-06-01T12:00:00Z)")


def check_window(now: datetime, start_at: datetime | None, end_at: datetime | None) -> None:
    """The checks of BRIEF 2.2 on a window, in its order; ``start_at`` None means now."""
    check_aware(startAt=start_at, endAt=end_at)
    start = start_at or now
    if start - now > MAX_AHEAD:
        raise Refusal("start_at_too_far_in_future", f"startAt is more than {MAX_AHEAD.total_seconds():.0f} s ahead")
    if end_at is None:
        return
    if end_at <= now:
        raise Refusal("end_at_in_the_past", "endAt has passed")
    if end_at <= start:
        raise Refusal("validation_error", "endAt must be after startAt")
    if end_at - start > MAX_AHEAD:
        raise Refusal("interval_too_long", f"endAt - startAt is more than {MAX_AHEAD.total_seconds():.0f} s")


def assets_for(entity: Entity, listed: Sequence[str] | None) -> tuple[str, ...] | None:
    """What ``assetIdentifiers`` means for one device (BRIEF 2.2: only its listed assets take
    the command): the listed ones it has. None for a device the fleet lists no assets of (the
    filter does not apply). A device with assets, none of them listed, is refused: it would
    take nothing."""
    if listed is None or not entity.assets:
        return None
    mine = tuple(a for a in entity.assets if a in set(listed))
    if not mine:
        raise Refusal("unknown_asset_identifier",
                      f"none of assetIdentifiers is an asset of {entity.id} (it has {', '.join(entity.assets)})")
    return mine


def build(
    fleet: Fleet,
    entity: Entity,
    fields: CommandFields,
    *,
    now: datetime,
    source: str,
    command_id: str | None = None,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
    asset_identifiers: Sequence[str] | None = None,
    expires_at: datetime | None = None,
    ignore_cooldown: bool = False,
) -> CommandAcceptedV1:
    """A command for one entity, checked: supported by it, a sound window, assets it has
    (:func:`assets_for`)."""
    if command_id is not None and command_id.endswith(REVERT_SUFFIX):
        raise Refusal("validation_error", f"command ids ending in {REVERT_SUFFIX!r} are dercmd's own (reverts)")
    check_supported(fleet, entity, fields.type)
    check_window(now, start_at, end_at)
    check_aware(expiresAt=expires_at)
    if end_at is not None and fields.type not in WINDOWED_TYPES:
        raise Refusal("validation_error", f"{fields.type} holds until replaced: it takes no endAt")
    return CommandAcceptedV1(
        id=command_id or new_id(),
        entity_id=entity.id,
        type=fields.type,
        value=fields.value,
        percentage=fields.percentage,
        trigger_time=start_at,
        end_at=end_at,
        asset_identifiers=assets_for(entity, asset_identifiers),
        expires_at=expires_at,
        ignore_cooldown=ignore_cooldown,
        accepted_at=now,
        source=source,
    )
