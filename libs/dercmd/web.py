"""Serving an HTTP service (intake, simulator) with the project's logging."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from . import logs
from .settings import Settings


def serve(service: str, app: FastAPI, settings: Settings, port: int) -> None:
    """Run until SIGINT/SIGTERM."""
    logs.configure(service, settings.log_level)
    uvicorn.run(
        app,
        host=settings.bind_host,
        port=port,
        log_config=logs.logging_config(service, settings.log_level),
        timeout_graceful_shutdown=5,
    )
