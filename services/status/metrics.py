"""status's metrics, all of them: the fleet-level view of commands."""

from prometheus_client import Counter, Histogram

from dercmd.events import CommandStatus
from dercmd.metrics import LATENCY_BUCKETS

STATUS_EVENTS = Counter(
    "dercmd_status_events_total", "Status events folded into the ledger, by status.", ["status"]
)
# Every status from 0, so that the first of one after a scrape shows as an increase (a series
# that appears at 1 has no rate until it moves again, and an alert on the rate sees nothing).
for _status in CommandStatus:
    STATUS_EVENTS.labels(_status.value)
REFUSED = Counter(
    "dercmd_status_events_refused_total",
    "Status events refused because they name another entity than their command's (a forged or mistaken result).",
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
    "Open commands that the sweeper handed on (to arbitration or dispatch), by the status they were in and the action "
    "(announced_again: recovery from the ledger; expired: past a deadline; delivery_check: Sent without a result).",
    ["status", "action"],
)
SWEEPS = Counter(
    "dercmd_status_sweeps_total",
    "Rounds of the sweeper, by result (swept; ledger_behind: the ledger had not caught up with the status topic, "
    "so nothing was judged overdue).",
    ["result"],
)
