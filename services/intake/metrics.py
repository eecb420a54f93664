"""intake's metrics, all of them."""

from prometheus_client import Counter, Histogram

from dercmd.metrics import LATENCY_BUCKETS

ACCEPTED = Counter("dercmd_commands_accepted_total", "Commands accepted (Pending), by source (rest, kafka).", ["source"])
for _source in ("rest", "kafka"):  # from 0: the first acceptance after a scrape shows as an increase
    ACCEPTED.labels(_source)
REFUSED = Counter(
    "dercmd_commands_refused_total",
    "Commands refused at intake (REST 4xx or Kafka Rejected), by source and error key.",
    ["source", "key"],
)
MISROUTED = Counter(
    "dercmd_intake_requests_misrouted_total",
    "Kafka requests on another partition than their key's murmur2 partition (a producer with another partitioner): "
    "their entity's order is not guaranteed.",
)
ADMIT_SECONDS = Histogram(
    "dercmd_intake_admit_seconds",
    "From receiving a command to its Pending row and accepted event being durable.",
    ["source"],
    buckets=LATENCY_BUCKETS,
)
IDEMPOTENT_REPLAYS = Counter(
    "dercmd_intake_idempotent_replays_total",
    "POSTs answered with the answer kept under their Idempotency-Key (a client's retry): nothing created.",
)
