"""What operators type and the files they hand over, made into the API's bodies: times (ISO 8601
or ``+10s``), JSON or YAML documents, batches cut to the API's 100 devices, and id files."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from .client import EXIT_USAGE, CliError

#: Most devices one ``POST /v1/command/`` takes (BRIEF 2.2).
BATCH_MAX_DEVICES = 100
CURTAILMENT = "limitProductionPower"

_RELATIVE = re.compile(r"^\+((?:\d+[smhd])+)$")
_PART = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def usage(message: str) -> CliError:
    return CliError(message, code=EXIT_USAGE)


def resolve_time(value: object, what: str, now: datetime | None = None) -> str:
    """ISO 8601 in UTC for the API, from ISO 8601 with a zone or ``+10s``, ``+5m``, ``+1h30m``,
    ``+1d`` after ``now``. A time without a zone is refused: which zone was meant is a guess."""
    if isinstance(value, datetime):  # YAML reads an unquoted timestamp as one
        moment = value
    elif match := _RELATIVE.match(text := str(value).strip()):
        seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _PART.findall(match.group(1)))
        moment = (now or datetime.now(UTC)) + timedelta(seconds=seconds)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise usage(f"{what}: {value!r} is not a time; use ISO 8601 with a zone "
                        "(2025-06-01T14:00:00+02:00, ...Z) or +10s, +5m, +1h") from None
    if moment.tzinfo is None:
        raise usage(f"{what}: {value} has no time zone; add one (Z, +02:00) or use +10s, +5m, +1h")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_text(source: str) -> str:
    """A file's text, or stdin for ``-``."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise usage(f"cannot read {source}: {exc.strerror or exc}") from exc


def parse_document(text: str, source: str) -> Any:
    """JSON, else YAML (JSON first: PyYAML refuses tab-indented JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise usage(f"{source} is neither JSON nor YAML: {exc}") from exc


def file_or_inline(argument: str) -> Any:
    """A document from a file (``-``: stdin) or, when no such file exists, the argument itself."""
    if argument == "-" or Path(argument).is_file():
        return parse_document(read_text(argument), argument)
    if argument.lstrip()[:1] in ("[", "{"):
        return parse_document(argument, "the argument")
    raise usage(f"{argument} is neither a file nor inline JSON")


def _mapping(item: Any, what: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise usage(f"{what} must be an object, not {json.dumps(item, default=str)[:80]}")
    return item


def _items(doc: Any) -> list[Any]:
    """One object or a list of them, as a list."""
    return doc if isinstance(doc, list) else [doc]


def schedule_body(doc: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """``[{"triggerTime", "type", "value"?}, ...]`` from one item or a list, times resolved."""
    body = []
    for n, item in enumerate(_items(doc), 1):
        entry = _mapping(item, f"schedule item {n}")
        if "triggerTime" not in entry or "type" not in entry:
            raise usage(f"schedule item {n} needs triggerTime and type")
        body.append({**entry, "triggerTime": resolve_time(entry["triggerTime"], f"item {n} triggerTime", now)})
    return body


def curtailment(percentage: int, start: str, end: str, assets: list[str] | None,
                now: datetime | None = None) -> dict[str, Any]:
    """The ``command`` of a batch request from the convenience options."""
    command: dict[str, Any] = {
        "type": CURTAILMENT,
        "percentage": percentage,
        "startAt": resolve_time(start, "--start", now),
        "endAt": resolve_time(end, "--end", now),
    }
    if assets:
        command["assetIdentifiers"] = assets
    return command


def cut(command: dict[str, Any], devices: list[str]) -> list[dict[str, Any]]:
    """Batch requests of at most 100 devices each, all with the same command."""
    if not devices:
        raise usage("a batch needs at least one device id")
    return [{"command": command, "deviceHashIds": devices[i:i + BATCH_MAX_DEVICES]}
            for i in range(0, len(devices), BATCH_MAX_DEVICES)]


def batch_requests(doc: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """The requests a batch file holds (one request or a list), relative times resolved and
    each cut to 100 devices."""
    requests = []
    for n, item in enumerate(_items(doc), 1):
        request = _mapping(item, f"batch request {n}")
        command = dict(_mapping(request.get("command"), f"request {n}'s command"))
        devices = request.get("deviceHashIds")
        if not isinstance(devices, list):
            raise usage(f"batch request {n} needs deviceHashIds, a list of device ids")
        for field in ("startAt", "endAt"):
            if field in command:
                command[field] = resolve_time(command[field], f"request {n} {field}", now)
        requests += cut(command, [str(d) for d in devices])
    return requests


def read_devices(source: str) -> list[str]:
    """Device ids from a file (``-``: stdin): a JSON list, or one per line (``#`` comments and
    blank lines skipped). A repeated id is dropped: it would only supersede itself."""
    text = read_text(source)
    doc = parse_document(text, source) if text.lstrip().startswith("[") else None
    ids = [str(d) for d in doc] if isinstance(doc, list) else [
        line.split("#", 1)[0].strip() for line in text.splitlines()]
    return list(dict.fromkeys(i for i in ids if i))


def read_ids(source: str) -> list[str]:
    """Command ids from what ``batch --out`` wrote (``{"commands": [{"id"}, ...]}``), an API
    answer, a JSON list of ids or of commands, or one id per line."""
    text = read_text(source)
    try:
        doc = json.loads(text)
    except ValueError:
        return _some(list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip())), source)
    if isinstance(doc, dict):
        doc = doc.get("commands", [doc])
    if not isinstance(doc, list):
        raise usage(f"{source} holds no command ids")
    ids = [item.get("id") if isinstance(item, dict) else item for item in doc]
    if not all(isinstance(i, str) and i for i in ids):
        raise usage(f"{source}: every entry needs a command id")
    return _some(list(dict.fromkeys(ids)), source)


def _some(ids: list[str], source: str) -> list[str]:
    if not ids:
        raise usage(f"{source} holds no command ids")
    return ids


def write_ids(target: Path, commands: list[dict[str, Any]]) -> None:
    """The batch's commands in the shape of the API's answer, for ``dercmd watch`` later."""
    target.write_text(json.dumps({"commands": commands}, indent=2) + "\n")
