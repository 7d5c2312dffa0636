"""The autoscaling policy of Fermion's Ray deployments: batches over channels count too.

Serve's own policy sizes a deployment by the requests its handles route. A batch
that goes over Fermion's channel (``backends.channel``) passes no handle, so each
replica reports the batches its channel carried (``ReplicaDeployment.
record_autoscaling_stats``) and this policy adds them to the handles' count.

It runs in Serve's controller, which receives it pickled by value: it may use the
standard library only, never another module of Fermion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

__all__ = ["CHANNEL_BATCHES", "channel_aware_policy"]

#: The custom metric each replica reports: the mean number of its channel's batches in
#: progress since its last report.
CHANNEL_BATCHES = "fermion_channel_batches"


def channel_aware_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas wanted: every batch in progress, over a handle or a channel, over the target.

    Serve's own policy with one more term: ``(handles' requests + channels' batches) /
    target_ongoing_requests``. Serve applies bounds, delays and scaling factors to it,
    and starts the first replica of a deployment scaled to zero (a batch then goes by a
    handle, since no channel is offered yet).
    """
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(CHANNEL_BATCHES, {})
    batches = float(ctx.total_num_requests) + sum(reported.values())
    config: Any = ctx.config  # the deployment's AutoscalingConfig
    return batches / config.get_target_ongoing_requests(), {}
