"""arbitration's metrics, all of them."""

from prometheus_client import Counter, Histogram

from dercmd.metrics import LATENCY_BUCKETS

DECISIONS = Counter(
    "dercmd_arbitration_decisions_total",
    "Accepted commands decided, by outcome (activated, scheduled, cooldown, expired).",
    ["outcome"],
)
REDELIVERED = Counter(
    "dercmd_arbitration_redelivered_total", "Accepted events seen before; their first decision was re-emitted."
)
SUPERSEDED = Counter("dercmd_arbitration_superseded_total", "Commands canceled because a newer one took their slot.")
CANCELS = Counter(
    "dercmd_arbitration_cancels_total",
    "Cancels decided (a caller's DELETE or a deadline), by outcome (canceled, ended, finished).",
    ["outcome"],
)
DUE = Counter(
    "dercmd_arbitration_due_total",
    "Due-index entries acted on, by kind (start, end) and outcome (activated, waiting, expired, ended, lapsed, gone).",
    ["kind", "outcome"],
)
START_LATENESS = Histogram(
    "dercmd_arbitration_start_lateness_seconds",
    "How long after its startAt a scheduled command was activated (its dispatch order follows).",
    buckets=LATENCY_BUCKETS,
)
