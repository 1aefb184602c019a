"""``average``: the sample-weighted mean (FedAvg)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medgan_core.policies.base import Arrays, CombinePolicy


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Sample-weighted mean of several sites' arrays with identical names and shapes (float64 sums)."""
    if not updates:
        raise ValueError("no updates to average")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    mean: dict[str, np.ndarray] = {}
    for name in updates[0]:
        acc = np.zeros(np.shape(updates[0][name]), dtype=np.float64)
        for update, weight in zip(updates, weights):
            acc += np.asarray(update[name], dtype=np.float64) * (weight / total)
        mean[name] = acc.astype(np.asarray(updates[0][name]).dtype)
    return mean


class WeightedMean(CombinePolicy):
    name = "average"
    linear = True

    def combine(self, updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
        return weighted_mean(updates, weights)

    def describe(self) -> str:
        return "sample-weighted mean"
