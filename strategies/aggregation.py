"""Weighted means of named arrays, per parameter group. Pure numpy: no Flower, no torch."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medgan_core.arrays import group_of


def split_groups(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{"generator.a": x, "discriminator.b": y}`` -> ``{"generator": {...}, "discriminator": {...}}``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        groups.setdefault(group_of(name), {})[name] = array
    return groups


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


def aggregate_by_group(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], groups: Sequence[str]
) -> dict[str, np.ndarray]:
    """Average each named group separately; every group must be present in every update."""
    split = [split_groups(u) for u in updates]
    out: dict[str, np.ndarray] = {}
    for group in groups:
        out.update(weighted_mean([s[group] for s in split], weights))
    return out
