"""Prometheus metrics of A/B routing, shadow comparison and canary rollouts.

Registered in prometheus_client's default registry, which ``/metrics`` exports.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ROLLOUT_ROLLBACKS",
    "ROLLOUT_STEP",
    "ROUTE_REQUESTS",
    "SHADOW_MAX_ABS_DIFF",
    "SHADOW_REQUESTS",
    "SHADOW_ROWS",
    "SHADOW_TOP1_AGREEMENT",
]

ROUTE_REQUESTS = Counter(
    "fermion_route_requests",
    "Requests of routed models by the version that answered them, and outcome.",
    ["model", "version", "outcome"],
)
SHADOW_REQUESTS = Counter(
    "fermion_shadow_requests",
    "Mirrored requests by outcome: ok, error (the shadow failed), shed (not mirrored).",
    ["model", "primary", "shadow", "outcome"],
)
SHADOW_ROWS = Counter(
    "fermion_shadow_rows",
    "Rows compared between primary and shadow; agree: whether their top-1 class agreed.",
    ["model", "primary", "shadow", "agree"],
)
SHADOW_MAX_ABS_DIFF = Histogram(
    "fermion_shadow_max_abs_diff",
    "Largest absolute difference between primary and shadow outputs, per mirrored request.",
    ["model", "primary", "shadow"],
    buckets=(0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0),
)
SHADOW_TOP1_AGREEMENT = Gauge(
    "fermion_shadow_top1_agreement",
    "Share of compared rows whose top-1 class agreed, since the gateway started.",
    ["model", "primary", "shadow"],
)
ROLLOUT_STEP = Gauge(
    "fermion_rollout_step_percent",
    "The candidate's share of traffic in the model's current or last rollout, in percent.",
    ["model", "candidate"],
)
ROLLOUT_ROLLBACKS = Counter(
    "fermion_rollout_rollbacks",
    "Rollouts rolled back to 0%, automatically or by an operator.",
    ["model"],
)
