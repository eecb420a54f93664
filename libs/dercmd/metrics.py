"""Prometheus plumbing. Each service declares its own metrics in one module
(``dercmd.<service>.metrics``); names use base units and ``_total``, never a device id label."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

#: Buckets for command latencies, seconds: a millisecond up to a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` response."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
