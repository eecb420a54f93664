"""Fixtures for real parts: a Redis server, a PostgreSQL database, the embedded broker, and
the whole stack started through the launcher that `make run` uses.

Redis and PostgreSQL are the local servers (DERCMD_TEST_REDIS_URL, DERCMD_TEST_POSTGRES_URL).
Outside CI a test that needs a server that does not answer is skipped with the reason; in CI
(CI=true) it fails, because CI must prove everything.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis
import sqlalchemy

from dercmd.launcher import Stack, free_port

T = TypeVar("T")

REDIS_URL = os.environ.get("DERCMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "DERCMD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres"
)


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not available: {exc!r}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wait_for(probe: Callable[[], T | None], *, deadline_s: float = 30.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def redis_db_url(db: int) -> str:
    base = REDIS_URL.rsplit("/", 1)[0]
    return f"{base}/{db}"


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database (index 14) emptied before each test."""
    url = redis_db_url(14)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        _unavailable(f"Redis at {url}", exc)
    yield url
    client.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"dercmd_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        _unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.sqlite3"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded broker for tests that need Kafka but no services."""
    stack = Stack(
        env={"DERCMD_KAFKA_BOOTSTRAP": "", "DERCMD_EMBEDDED_KAFKA_PORT": str(free_port()), "DERCMD_REDIS_URL": redis_db_url(14)},
        log_dir=tmp_path_factory.mktemp("broker-logs"),
        services=(),
    )
    try:
        stack.start()
    except Exception as exc:
        _unavailable("the embedded broker", exc)
    yield stack.settings.kafka_bootstrap
    stack.stop()
