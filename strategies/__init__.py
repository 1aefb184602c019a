"""GAN-aware aggregation: how each parameter group is combined across sites."""

from strategies.aggregation import aggregate_by_group, aggregate_by_policy, split_groups, weighted_mean
from strategies.grouped_fedavg import (
    GroupedFedAdam,
    GroupedFedAvgM,
    GroupedFedAvg,
    GroupedFedYogi,
    RoundLog,
    SiteReply,
    build_strategy,
    weighted_metrics,
)

__all__ = [
    "GroupedFedAdam", "GroupedFedAvg", "GroupedFedAvgM", "GroupedFedYogi", "RoundLog", "SiteReply", "build_strategy",
    "weighted_metrics", "aggregate_by_group", "aggregate_by_policy", "split_groups",
    "weighted_mean",
]
