"""dispatch's metrics, all of them."""

from prometheus_client import Counter, Histogram

from dercmd.metrics import LATENCY_BUCKETS

ORDERS = Counter(
    "dercmd_dispatch_orders_total",
    "Dispatch orders handled, by result (sent, failed, stale, redelivered).",
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
