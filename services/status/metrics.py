"""status's metrics, all of them: the fleet-level view of commands."""

from prometheus_client import Counter, Histogram

from dercmd.metrics import LATENCY_BUCKETS

STATUS_EVENTS = Counter(
    "dercmd_status_events_total", "Status events folded into the ledger, by status.", ["status"]
)
IGNORED = Counter(
    "dercmd_status_events_ignored_total", "Status events that did not move a command (duplicate, late, after terminal)."
)
COMPLETION_SECONDS = Histogram(
    "dercmd_command_completion_seconds",
    "From acceptance to the terminal status, by terminal status.",
    ["status"],
    buckets=LATENCY_BUCKETS,
)
SWEPT = Counter(
    "dercmd_status_swept_total",
    "Open commands past a deadline that the sweeper handed on (to arbitration or dispatch), by the status they were in.",
    ["status"],
)
