"""Structured logs: one JSON object a line, with whatever ``extra=`` a call passes
(``command_id``, ``entity_id``, ...).

No request can make a long line: the message and every field are cut at :data:`MAX_FIELD`
characters (a traceback at :data:`MAX_EXC`, keeping its end), with a marker saying how much
was cut (``…[cut 1046528 chars]``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

#: The most characters of a message or of a field's value a line holds.
MAX_FIELD = 2048
#: The most characters of a traceback a line holds (its end: where it failed).
MAX_EXC = 16384

_SCALARS = (int, float, bool, type(None))


def cap(value: str, limit: int = MAX_FIELD) -> str:
    """``value``, cut to ``limit`` characters with a marker saying how many were cut."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…[cut {len(value) - limit} chars]"


def _capped(value: Any) -> Any:
    """A field's value, cut if its JSON would be longer than :data:`MAX_FIELD` (strings, the
    common case, cost a length check; other values are written out once to be measured)."""
    if isinstance(value, str):
        return cap(value)
    if isinstance(value, _SCALARS):
        return value
    text = json.dumps(value, default=str)
    return value if len(text) <= MAX_FIELD else cap(text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": cap(record.getMessage()),
        }
        line.update({k: _capped(v) for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            exc = self.formatException(record.exc_info)
            line["exc"] = exc if len(exc) <= MAX_EXC else f"…[cut {len(exc) - MAX_EXC} chars]{exc[-MAX_EXC:]}"
        return json.dumps(line, default=str)


def logging_config(service: str, level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict; uvicorn takes it as ``log_config``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter, "service": service}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": sys.stderr}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            # Chatty libraries stay at WARNING unless asked for DEBUG.
            name: {"level": "DEBUG" if level.upper() == "DEBUG" else "WARNING"}
            for name in ("aiokafka", "uvicorn.access", "httpx", "httpcore")
        },
    }


def configure(service: str, level: str) -> None:
    import logging.config

    logging.config.dictConfig(logging_config(service, level))
