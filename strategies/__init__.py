"""GAN-aware aggregation: how each parameter group is combined across sites."""

from strategies.aggregation import aggregate_by_group, split_groups, weighted_mean
from strategies.grouped_fedavg import GroupedFedAvg, RoundLog, SiteReply, weighted_metrics

__all__ = ["GroupedFedAvg", "RoundLog", "SiteReply", "weighted_metrics", "aggregate_by_group", "split_groups", "weighted_mean"]
