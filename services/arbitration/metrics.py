"""arbitration's metrics, all of them."""

from prometheus_client import Counter

DECISIONS = Counter(
    "dercmd_arbitration_decisions_total",
    "Accepted commands decided, by outcome (activated, scheduled, cooldown, expired).",
    ["outcome"],
)
REDELIVERED = Counter(
    "dercmd_arbitration_redelivered_total", "Accepted events seen before; their first decision was re-emitted."
)
SUPERSEDED = Counter("dercmd_arbitration_superseded_total", "Commands canceled because a newer one took their slot.")
