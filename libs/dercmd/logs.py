"""Structured logs: one JSON object a line, with whatever ``extra=`` a call passes
(``command_id``, ``entity_id``, ...)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


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
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
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
