"""Every setting, read from ``DERCMD_*`` environment variables.

Each service reads its own class (:class:`IntakeSettings`, :class:`DispatchSettings`, ...):
what every service needs is :class:`ServiceSettings`, and a field one service alone reads is
declared on that service's class. :class:`Settings` is all of them at once (the launcher, the
benchmark, the tests, the documented list). Defaults work on one machine (``make run``);
docker-compose.yml overrides what differs on a cluster. docs/operations.md lists every field
(tests/unit/test_docs.py checks it): describe a new field where it is declared and add it there.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal, Self, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)

#: The example fleet's file: its tokens are published in the README.
EXAMPLE_FLEET = "deploy/fleet.example.yaml"


#: In production a secret is at least this long (bytes) and looks random: what anyone could
#: guess or brute-force signs results and webhooks as well as dercmd does.
MIN_SECRET_BYTES = 32
#: ... and carries at least this much information by its own characters' spread (Shannon
#: entropy per character times its length): 32 random hex digits carry about 110 bits,
#: "passwordpassword..." about 88.
MIN_SECRET_BITS = 96.0


def _secret_fields(settings: BaseSettings) -> list[str]:
    return [name for name, field in type(settings).model_fields.items()
            if ("secret" in name or "token" in name) and field.annotation is str]


def _entropy_bits(text: str) -> float:
    if not text:
        return 0.0
    counts = Counter(text)
    return -len(text) * sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def weak_secrets(settings: BaseSettings) -> list[str]:
    """The environment variables of secrets (fields named ``*secret*`` or ``*token*``) that are
    shorter than :data:`MIN_SECRET_BYTES` or carry less than :data:`MIN_SECRET_BITS`."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    weak = []
    for name in _secret_fields(settings):
        value = getattr(settings, name)
        if len(value.encode()) < MIN_SECRET_BYTES or _entropy_bits(value) < MIN_SECRET_BITS:
            weak.append(f"{prefix}{name}".upper())
    return weak


def documented_defaults(settings: BaseSettings) -> list[str]:
    """The environment variables of secrets (fields named ``*secret*`` or ``*token*``) that
    still hold their documented default: anyone who read the README knows them."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    return [f"{prefix}{name}".upper() for name, field in type(settings).model_fields.items()
            if ("secret" in name or "token" in name) and isinstance(field.default, str) and field.default
            and getattr(settings, name) == field.default]


class FromFiles(BaseSettings):
    """Settings that may also come from files: ``<VARIABLE>_FILE`` (:class:`FileVariables`)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, FileVariables(settings_cls), env_settings, dotenv_settings, file_secret_settings)


class ServiceSettings(FromFiles):
    """What every service reads: the broker, Redis and the fleet, where each service listens
    (services reach each other, and the simulator, by these), and how consumers and producers
    behave."""

    model_config = SettingsConfigDict(env_prefix="DERCMD_", extra="ignore")

    environment: Literal["development", "production"] = Field(
        "development",
        description="`production`: a service refuses to start while a secret it reads holds its documented default or is weak (under 32 bytes, or not random) (`DERCMD_CALLBACK_SECRET`, the backends' tokens and secrets), the fleet file is the example's, or it grants the example's public bearer tokens.",
    )
    kafka_bootstrap: str = Field(
        "",
        description="Kafka bootstrap servers (host:port,...). Empty: `make run` starts an embedded broker.",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for locks, fences, slots and cooldowns.")
    redis_max_connections: int = Field(
        1024, ge=1, description="Connections each service process opens to Redis at most (a call beyond them fails and is retried)."
    )
    fleet_file: str = Field(
        EXAMPLE_FLEET, description="Entities, their kind/vendor/backend, and bearer tokens."
    )
    bind_host: str = Field("127.0.0.1", description="Address every service's HTTP server binds to.")
    api_port: int = Field(8080, description="intake: REST API, OpenAPI docs at /docs, /metrics, /health.")
    arbitration_port: int = Field(8081, description="arbitration: /metrics, /health.")
    dispatch_port: int = Field(8082, description="dispatch: /metrics, /health, vendor callbacks.")
    status_port: int = Field(8083, description="status: /metrics, /health.")
    simulator_port: int = Field(8090, description="simulator: vendor-cloud API, /sim/devices/{id}/received.")
    ocpp_gateway_port: int = Field(
        8084, description="ocpp_gateway: OCPP 1.6J charge points connect to ws://host:port/ocpp/{chargePointId}; dispatch's calls, /metrics, /health."
    )
    sim_modbus_port: int = Field(
        8502, description="simulator: Modbus TCP port of the simulated SunSpec inverters (every sunspec-modbus entity a unit id)."
    )
    topic_partitions: int = Field(
        2,
        description="Partitions of every topic created at start-up: at most this many replicas of a service share the work (compose: 12).",
    )
    topic_replication: int = Field(1, description="Replication factor of topics created at start-up.")
    kafka_fetch_max_wait_ms: int = Field(
        20, description="Longest a consumer fetch waits for data: the most a batch waits to fill."
    )
    kafka_commit_interval_ms: int = Field(
        100, ge=0, description="A consumer commits its finished batches' offsets at most this often, ms (each commit is a broker request; a crash redelivers what was not committed, which every consumer tolerates)."
    )
    kafka_linger_ms: int = Field(
        0, description="Producer linger, milliseconds (services pack each batch themselves, so waiting adds only latency)."
    )
    batch_max_records: int = Field(
        200, ge=1, description="Most records a consumer takes into one batch (one Redis round trip, one ledger transaction)."
    )
    stall_after_s: float = Field(
        30.0, gt=0, description="A partition with records waiting whose commits have not moved for this long is reported stalled."
    )
    kafka_idempotence: bool = Field(
        False, description="Idempotent producer (Apache Kafka only; the embedded broker refuses it)."
    )
    kafka_session_timeout_ms: int = Field(10_000, description="Consumer group session timeout.")
    kafka_heartbeat_ms: int = Field(2_000, description="Consumer group heartbeat interval.")
    embedded_kafka_port: int = Field(9092, description="Port of the embedded broker `make run` starts.")
    log_level: str = Field("INFO", description="Log level of every service.")

    @model_validator(mode="after")
    def _no_public_secrets_in_production(self) -> Self:
        if self.environment == "production":
            public = documented_defaults(self) + (["DERCMD_FLEET_FILE (the example fleet)"] if self.fleet_file == EXAMPLE_FLEET else [])
            if public:
                raise ValueError(published_message(public))
            weak = weak_secrets(self)
            if weak:
                raise ValueError(weak_message(weak))
        return self



class _Ledger(ServiceSettings):
    # (a base of every service class that writes the ledger; it inherits the DERCMD_ prefix)
    database_url: str = Field(
        "sqlite:///var/dercmd.sqlite3",
        description="SQLAlchemy URL of the ledger (SQLite file by default; `postgresql+psycopg://...` in production).",
    )


class _SentDeadline(ServiceSettings):
    deadline_sent_s: float = Field(
        120.0, gt=0, description="status sweeper: a command Sent this long without a result is checked with its backend, else ends Failed: no_confirmation."
    )


class IntakeSettings(_Ledger):
    """intake: it writes each accepted command's Pending row."""

    requests_misrouted: Literal["count", "refuse"] = Field(
        "count",
        description="intake: a Kafka request on another partition than its key's murmur2 partition (a producer with another partitioner, e.g. librdkafka's default) is counted and logged (`count`), or also refused as `Rejected: wrong_partition` (`refuse`): an entity's requests on two partitions may be taken in either order.",
    )
    idempotency_ttl_s: float = Field(
        86400.0, gt=0, description="intake: how long a POST's `Idempotency-Key` and its answer are kept (in Redis, for every replica), s."
    )


class ArbitrationSettings(ServiceSettings):
    cooldown_s: float = Field(
        600.0, description="Default cooldown between commands to one entity, seconds (fleet file may override; 0 disables)."
    )
    due_tick_ms: int = Field(
        50, ge=1, description="arbitration: how often each replica polls the due-index for scheduled starts and window ends, ms."
    )
    due_lead_ms: int = Field(
        2000, ge=0, description="arbitration: scheduled starts and window ends are acted on this far ahead; their orders wait at dispatch until the time (0: at the time)."
    )


class DispatchSettings(_SentDeadline):
    dispatch_callback_url: str = Field(
        "",
        description="URL at which vendor backends reach dispatch (any replica takes any result; behind a load balancer, its address); empty: http://{bind_host}:{dispatch_port}.",
    )
    callback_secret: str = Field(
        "dercmd-dev-callback-secret",
        description="Key of the HMAC in the token dispatch hands a backend with each command, which authenticates its result (shared by all dispatch replicas; set your own).",
    )
    dispatch_backend_batch: int = Field(
        200, ge=1, description="dispatch: most commands one backend call carries (where the backend's protocol takes several)."
    )
    dispatch_concurrency: int = Field(
        16, ge=1, description="dispatch: backend calls in flight at once, per backend (deliveries in flight <= this x the batch)."
    )
    dispatch_retry_for_s: float = Field(
        30.0, gt=0, description="dispatch: how long after a command was due it is sent again when the backend did not take it (never after a window's end); then Failed."
    )
    dispatch_retry_base_ms: int = Field(
        200, ge=1, description="dispatch: first backoff before sending again, ms; it doubles per attempt (full jitter), up to the max."
    )
    dispatch_retry_max_ms: int = Field(5000, ge=1, description="dispatch: longest backoff between two attempts, ms.")
    dispatch_unknown_grace_s: float = Field(
        5.0, ge=0, description="dispatch: how long after a call got no answer (or dispatch stopped during it) the backend is asked what became of it: at least the backend's call timeout."
    )
    dispatch_breaker_failures: int = Field(
        5, ge=1, description="dispatch: calls to one backend failing as a whole in a row that open its circuit (no calls for a while)."
    )
    dispatch_breaker_open_s: float = Field(
        10.0, gt=0, description="dispatch: how long an open circuit stays open before one trial call."
    )
    dispatch_report_after_s: float = Field(
        1.0,
        ge=0,
        description="dispatch: how long after a window's start or end reached a device it asks the backend for the extra measurement report (unless a periodic one is due within 3 s).",
    )

    @property
    def callback_base_url(self) -> str:
        return self.dispatch_callback_url or f"http://{self.bind_host}:{self.dispatch_port}"


class StatusSettings(_Ledger, _SentDeadline):
    status_linger_ms: int = Field(
        250, ge=0, description="status: a batch smaller than DERCMD_STATUS_BATCH_MAX_RECORDS waits this long after the one before it, ms (bigger batches cost less per event; the ledger and `dercmd.commands.state` lag the status topic by about this much, the status topic itself not at all)."
    )
    status_batch_max_records: int = Field(
        1000, ge=1, description="status: most status events in one batch (folded into the ledger 300 to a transaction)."
    )
    recover_after_s: float = Field(
        20.0, gt=0, description="status sweeper: a command Pending (past its start) or Triggered this long is announced to arbitration again from the ledger (its records may have been lost with a broker); arbitration repeats its decision, dispatch never delivers twice."
    )
    deadline_pending_s: float = Field(
        60.0, gt=0, description="status sweeper: a command still Pending this long after its start (not arbitrated) ends Failed: expired."
    )
    deadline_triggered_s: float = Field(
        60.0, gt=0, description="status sweeper: a command Triggered this long and not claimed by dispatch ends Failed: expired."
    )
    sweep_interval_s: float = Field(5.0, gt=0, description="status sweeper: how often open commands are checked against their deadlines, s.")


class OcppGatewaySettings(ServiceSettings):
    """ocpp_gateway: its protocol's own settings are :class:`dercmd.protocols.ocpp` ones
    (``DERCMD_OCPP_*``)."""


class SimulatorSettings(ServiceSettings):
    sim_ocpp_passwords_file: str = Field(
        "deploy/ocpp-passwords.example.yaml",
        description="simulator: the simulated charge points' OCPP passwords (`chargePointId: password`, YAML), sent as HTTP Basic (OCPP 1.6 security profile 1) where the fleet file requires one; absent: none.",
    )
    sim_confirm_delay_ms: int = Field(
        5, description="simulator: how long a simulated device takes to confirm a command, ms."
    )
    sim_report_interval_s: float = Field(
        60.0, ge=0, description="simulator: interval of every measuring device's periodic measurement report, seconds (0: none)."
    )
    sim_token_ttl_s: int = Field(
        3600, ge=1, description="simulator: lifetime of the OAuth2 access tokens the simulated EV aggregator issues, seconds (short: clients renew often)."
    )


class Settings(IntakeSettings, ArbitrationSettings, DispatchSettings, StatusSettings, OcppGatewaySettings, SimulatorSettings):
    """Every service's settings at once: what the launcher hands the stack it starts, the
    benchmark and the tests; the documented list of ``DERCMD_*`` variables."""


def published_message(public: list[str]) -> str:
    return f"DERCMD_ENVIRONMENT=production, but these hold their documented defaults: {', '.join(public)}; set your own"


def weak_message(weak: list[str]) -> str:
    return (f"DERCMD_ENVIRONMENT=production, but these secrets are shorter than {MIN_SECRET_BYTES} bytes or not random "
            f"enough: {', '.join(weak)}; use e.g. `openssl rand -hex 32`")


def refuse_published(settings: ServiceSettings, *more: BaseSettings, tokens: Sequence[str] = ()) -> None:
    """In production, stop the service (a clear message, exit status 1) while any of ``more``
    (a backend's settings) holds a documented default secret or a weak one, or ``tokens`` names
    published bearer tokens the service would accept."""
    if settings.environment == "production":
        public = [name for extra in more for name in documented_defaults(extra)] + [f"bearer token {t!r}" for t in tokens]
        if public:
            raise SystemExit(f"dercmd: refusing to start: {published_message(public)}")
        weak = [name for extra in more for name in weak_secrets(extra)]
        if weak:
            raise SystemExit(f"dercmd: refusing to start: {weak_message(weak)}")


class FileVariables(PydanticBaseSettingsSource):
    """``<VARIABLE>_FILE``: the value of a setting read from a file, as container platforms
    hand secrets over (a Kubernetes or Docker secret mounted as a file), for every setting.
    A trailing newline is dropped. Setting both ``<VARIABLE>`` and ``<VARIABLE>_FILE`` is refused."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        prefix = str(self.settings_cls.model_config.get("env_prefix", ""))
        variable = f"{prefix}{field_name}".upper()
        path = os.environ.get(f"{variable}_FILE")
        if not path:
            return None, field_name, False
        if variable in os.environ:
            raise ValueError(f"both {variable} and {variable}_FILE are set: set one")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().removesuffix("\n").removesuffix("\r"), field_name, False
        except OSError as exc:
            raise ValueError(f"{variable}_FILE: cannot read {path}: {exc.strerror}") from None

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                found[key] = value
        return found


def load(kind: type[S], **values: Any) -> S:
    """``kind`` read from the environment (and ``values``); settings that are not valid (a
    published or weak secret in production among them) stop the process with one clear line
    instead of a traceback."""
    try:
        return kind(**values)
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise SystemExit(f"dercmd: refusing to start: {problems}") from None
    except ValueError as exc:  # a <VARIABLE>_FILE that cannot be read, or set twice
        raise SystemExit(f"dercmd: refusing to start: {exc}") from None


@lru_cache
def get_settings(kind: type[S] = Settings) -> S:  # type: ignore[assignment]
    """The settings of this process (``kind``: the service's own class), or one clear line and
    exit status 1 (:func:`load`)."""
    return load(kind)
