"""dispatch's metrics, all of them."""

from prometheus_client import Counter, Gauge, Histogram

from dercmd.metrics import LATENCY_BUCKETS

ORDERS = Counter(
    "dercmd_dispatch_orders_total",
    "Dispatch orders handled, by result (sent, failed, stale, redelivered; recovered: announced again by recovery "
    "with no delivery record, so the backend was asked first; expired: past the caller's expiresAt, never sent).",
    ["result"],
)
BACKEND_CALLS = Counter(
    "dercmd_dispatch_backend_calls_total", "Calls to device backends, by backend and result.", ["backend", "result"]
)
BACKEND_SECONDS = Histogram(
    "dercmd_dispatch_backend_call_seconds", "Duration of one call to a device backend.", ["backend"], buckets=LATENCY_BUCKETS
)
ACCEPT_TO_SENT_SECONDS = Histogram(
    "dercmd_dispatch_accept_to_sent_seconds",
    "From the command's acceptance to the backend accepting it.",
    buckets=LATENCY_BUCKETS,
)
CALLBACKS = Counter("dercmd_dispatch_callbacks_total", "Asynchronous results received from backends, by result.", ["result"])
CHECKS = Counter(
    "dercmd_dispatch_delivery_checks_total",
    "Delivery checks of commands left Sent, by result: succeeded / failed (the backend knew), no_confirmation "
    "(it did not, or could not say), republished (already ended: the recorded outcome is published again), "
    "not_open (not sent or accepted: nothing done).",
    ["result"],
)
REPORTS = Counter(
    "dercmd_dispatch_reports_total", "Device measurement reports published, by trigger (periodic, requested).", ["trigger"]
)
REPORT_REQUESTS = Counter(
    "dercmd_dispatch_report_requests_total",
    "Extra reports after a window's start or end, by result: requested, skipped (a periodic report due within 3 s), "
    "failed (the backend call failed), missing (the backend sent none for the device).",
    ["result"],
)
WEBHOOKS_REFUSED = Counter(
    "dercmd_dispatch_webhooks_refused_total",
    "Webhooks not taken, by backend and reason (invalid_signature, stale_webhook, replayed).",
    ["backend", "reason"],
)
REPORTS_REFUSED = Counter(
    "dercmd_dispatch_reports_refused_total",
    "Report POSTs or reports not taken, by reason (unauthorized, malformed, unknown_device).",
    ["reason"],
)
REPORT_SUBSCRIPTION_ERRORS = Counter(
    "dercmd_dispatch_report_subscription_errors_total", "Failed attempts to subscribe to a backend's reports, by backend.", ["backend"]
)
RETRIES = Counter(
    "dercmd_dispatch_retries_total", "Deliveries sent again after the backend did not take them, by backend and reason.",
    ["backend", "reason"],
)
UNKNOWN_DELIVERIES = Counter(
    "dercmd_dispatch_unknown_deliveries_total",
    "Deliveries whose fate was unknown (no answer after sending), by backend and how they were resolved: "
    "delivered / never_received (sent again) / unresolved (Failed: delivery_unknown).",
    ["backend", "resolution"],
)
RATE_LIMITED_SECONDS = Counter(
    "dercmd_dispatch_rate_limited_seconds_total", "Time calls waited for a backend's rate limit or Retry-After, by backend.", ["backend"]
)
CIRCUIT_STATE = Gauge(
    "dercmd_dispatch_circuit_state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open (this replica).", ["backend"]
)
CIRCUIT_TRANSITIONS = Counter(
    "dercmd_dispatch_circuit_transitions_total", "Circuit breaker state changes, by backend and new state.", ["backend", "state"]
)
