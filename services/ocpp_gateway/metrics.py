"""The OCPP gateway's metrics, all of them."""

from prometheus_client import Counter, Gauge, Histogram

from dercmd.metrics import LATENCY_BUCKETS

CONNECTED = Gauge("dercmd_ocpp_connected_charge_points", "Charge points with an open WebSocket to this gateway replica.")
CONNECTIONS = Counter(
    "dercmd_ocpp_connections_total", "WebSocket connections from charge points, by result (accepted, refused, replaced).", ["result"]
)
RECEIVED = Counter("dercmd_ocpp_messages_received_total", "CALLs received from charge points, by action.", ["action"])
LATE_TRANSACTIONS = Counter(
    "dercmd_ocpp_late_transactions_total",
    "StartTransactions refused because the command they carry had already ended otherwise (dercmd said Failed).",
)
CALLS = Counter(
    "dercmd_ocpp_calls_total",
    "CALLs to charge points, by action and result (Accepted, Rejected, call_error, no_answer, connection_closed, busy).",
    ["action", "result"],
)
CALL_SECONDS = Histogram(
    "dercmd_ocpp_call_seconds", "From sending a CALL to a charge point to its answer.", ["action"], buckets=LATENCY_BUCKETS
)
RESULTS = Counter(
    "dercmd_ocpp_results_total", "Results posted to dispatch from transaction messages, by result (posted, failed).", ["result"]
)
