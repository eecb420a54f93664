"""OCPP 1.6J as dercmd uses it: what the OCPP gateway (the central system the charge points
hold a WebSocket to) and dispatch's ``ocpp`` backend say to each other, and the few rules
both sides and the simulated charge points share.

Charge points connect to ``ws://<gateway>/ocpp/<chargePointId>`` with the subprotocol
``ocpp1.6``; the charge point id is the entity's device id. dispatch reaches the gateway
replica that holds a charge point's connection over HTTP (the replica records itself in Redis,
:mod:`dercmd.state.ocpp`):

    POST {gateway}/internal/v1/charge-points/{chargePointId}/commands
        Authorization: Bearer <DERCMD_OCPP_GATEWAY_TOKEN>
        body GatewayCommand {"commandId", "type", "idTag", "token", "resultUrl"}
        -> 200 GatewayAnswer {"status": "Accepted" | "Rejected"}: the charge point's answer
           to RemoteStartTransaction / RemoteStopTransaction
        -> 404 not_connected            no connection to it here: nothing was sent
           409 no_transaction           StopCharging while no transaction runs: nothing sent
           422 command_not_supported    the charge point did not declare the feature profile
                                        (or answered NotSupported / NotImplemented)
           503 booting | busy | call_error   not sent, or the charge point answered a
                                        CALLERROR before acting (InternalError, GenericError;
                                        ``retryAfterS`` when it asked for a pause)
           502 call_error               any other CALLERROR: it could not take the message
           504 no_answer | connection_closed   sent, and no answer came: it may have acted

    POST {gateway}/internal/v1/charge-points/{chargePointId}/outcomes
        body GatewayOutcomesQuery {"commandIds": [...]}: commands the charge point accepted
        and sent no transaction message for yet
        -> 200 GatewayFindings {"findings": [{"commandId", "finding", "message"?}, ...]}: the
           gateway reads the charge point back (TriggerMessage(StatusNotification) on connector
           1, where it declared RemoteTrigger): a start it accepted whose connector now charges,
           or a stop whose connector no longer does, SUCCEEDED; else PENDING

The result is the charge point's transaction message (StartTransaction for a start,
StopTransaction for a stop); the gateway POSTs it to ``resultUrl`` as :class:`OcppResults`,
each result with the ``token`` dispatch gave with the command.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from dercmd.events import CommandType
from dercmd.settings import ServiceSettings

from .common import Wire
from .settings import BackendSettings

#: The WebSocket subprotocol of OCPP 1.6J.
SUBPROTOCOL = "ocpp1.6"
#: Where a charge point connects on the gateway (followed by its id).
WS_PATH = "/ocpp"
COMMANDS_PATH = "/internal/v1/charge-points/{charge_point_id}/commands"
OUTCOMES_PATH = "/internal/v1/charge-points/{charge_point_id}/outcomes"
#: The only connector dercmd starts a transaction on.
CONNECTOR_ID = 1
#: OCPP 1.6's IdToken is CiString20; a CALL's message id at most 36 characters.
MAX_ID_TAG = 20
MAX_MESSAGE_ID = 36

#: The feature profile a command type needs the charge point to have declared in its
#: ``SupportedFeatureProfiles`` configuration key. RemoteStart/StopTransaction are Core.
PROFILE_OF: dict[CommandType, str] = {
    CommandType.START_CHARGING: "Core",
    CommandType.STOP_CHARGING: "Core",
}
SUPPORTED_FEATURE_PROFILES = "SupportedFeatureProfiles"
#: The profile of TriggerMessage, by which the gateway reads a charge point's connector back.
REMOTE_TRIGGER = "RemoteTrigger"
#: Connector statuses of a running transaction.
CHARGING_STATUSES = frozenset({"Charging", "SuspendedEV", "SuspendedEVSE"})
#: Connector statuses with no transaction.
IDLE_STATUSES = frozenset({"Available", "Preparing", "Finishing"})


def id_tag(command_id: str) -> str:
    """The idTag a StartCharging is sent with: derived from the command, so the charge
    point's StartTransaction (which carries the idTag) names the command it answers, within
    OCPP's 20 characters."""
    return "dc" + hashlib.sha256(command_id.encode()).hexdigest()[: MAX_ID_TAG - 2]


def new_message_id() -> str:
    """A CALL's message id: a fresh uuid4 (36 characters, OCPP's maximum) for every call,
    retries of a command included, so a charge point that de-duplicates by message id never
    takes a retry for the call it already answered. The command a call carries is correlated
    elsewhere: the gateway's record of the command (:mod:`dercmd.state.ocpp`, which also keeps
    its last call's message id), a start's idTag (:func:`id_tag`), a stop's transaction id."""
    return str(uuid.uuid4())


def profiles_of(declared: Iterable[CommandType] | None) -> list[str]:
    """The feature profiles a charge point that can do ``declared`` reports (None: it
    declared nothing in particular, a plain OCPP 1.6 charge point: Core)."""
    if declared is None:
        return ["Core"]
    return sorted({PROFILE_OF[t] for t in declared if t in PROFILE_OF})


def parse_profiles(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


class GatewayCommand(Wire):
    command_id: str
    type: CommandType
    id_tag: str = Field(max_length=MAX_ID_TAG)
    token: str
    result_url: str


class GatewayAnswer(Wire):
    status: Literal["Accepted", "Rejected"]


class GatewayError(Wire):
    key: str
    message: str = ""
    retry_after_s: float | None = None


class GatewayOutcomesQuery(Wire):
    command_ids: list[str] = Field(min_length=1)


class GatewayFinding(Wire):
    command_id: str
    finding: Literal["SUCCEEDED", "PENDING"]
    message: str | None = None


class GatewayFindings(Wire):
    findings: list[GatewayFinding]


class OcppResult(Wire):
    command_id: str
    token: str
    succeeded: bool
    message: str | None = None


class OcppResults(Wire):
    results: list[OcppResult] = Field(min_length=1)


class OcppSettings(BackendSettings):
    """Read by dispatch's ``ocpp`` backend, the gateway and the simulated charge points alike."""

    model_config = SettingsConfigDict(env_prefix="DERCMD_OCPP_", extra="ignore")
    LOCAL = ("gateway_url",)

    gateway_token: str = Field(
        "dercmd-dev-ocpp-gateway-secret", description="Bearer token dispatch presents to the OCPP gateway's internal API (set your own)."
    )
    call_timeout_s: float = Field(
        10.0, gt=0, description="How long the gateway waits for a charge point's answer to a call (and for its turn on the connection)."
    )
    heartbeat_interval_s: int = Field(
        60, ge=1, description="Heartbeat interval the gateway gives charge points at boot; a connection's Redis record expires after three missed."
    )
    reconnect_wait_s: float = Field(
        2.0, ge=0, description="How long a delivery waits for a charge point seen before to be connected and booted (a reconnect after a dropped connection) before it counts as not delivered."
    )
    gateway_url: str = Field(
        "", description="The URL at which dispatch reaches this gateway replica, recorded for each charge point it holds; empty: http://{bind_host}:{ocpp_gateway_port}."
    )

    def own_url(self, settings: ServiceSettings) -> str:
        return (self.gateway_url or f"http://{settings.bind_host}:{settings.ocpp_gateway_port}").rstrip("/")

    @property
    def link_ttl_s(self) -> int:
        return 3 * self.heartbeat_interval_s

    @property
    def http_timeout_s(self) -> float:
        """The gateway may wait for its turn on the connection and then for the answer."""
        return 2 * self.call_timeout_s + 2


# -- security profile 1: HTTP Basic with a per-charge-point password (OCPP 1.6 security
# whitepaper). The password (the charge point's AuthorizationKey) is random, 16 to 40 bytes, so
# a salted SHA-256 keeps it as well as a slow password hash would, at a cost a gateway taking
# thousands of reconnects at once can pay.

PASSWORD_HASH_SCHEME = "sha256"


def hash_password(password: str, *, salt: str | None = None) -> str:
    """``sha256$<salt>$<hex digest of salt + password>``: what the fleet file keeps."""
    salt = salt if salt is not None else secrets.token_hex(8)
    return f"{PASSWORD_HASH_SCHEME}${salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def password_matches(stored: str, password: str) -> bool:
    scheme, _, rest = stored.partition("$")
    salt, _, digest = rest.partition("$")
    if scheme != PASSWORD_HASH_SCHEME or not digest:
        return False
    return hmac.compare_digest(hash_password(password, salt=salt), stored)


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """``(user, password)`` of an ``Authorization: Basic ...`` header, else None."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("latin-1").partition(":")
    except (ValueError, binascii.Error):
        return None
    return (user, password) if sep else None


def basic_authorization(user: str, password: str) -> str:
    """The ``Authorization`` header a charge point sends under security profile 1."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1")).decode()
