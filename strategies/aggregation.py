"""Combining named arrays across sites, per parameter group: weighted mean, trimmed mean,
median. numpy (and Flower's own trimmed mean); no torch."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from medgan_core.arrays import group_of

#: Policies a strategy computes; ``local`` groups never reach it.
COMBINED_POLICIES = ("average", "trimmed-mean", "median")


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


def coordinate_wise(
    updates: Sequence[Mapping[str, np.ndarray]], policy: str, trim_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """Unweighted robust combination, element by element: ``median``, or ``trimmed-mean``
    (Flower's, dropping ``trim_fraction`` of the sites at each end). A single bad site
    cannot drag such a group arbitrarily far, unlike a mean."""
    if not updates:
        raise ValueError("no updates to combine")
    out: dict[str, np.ndarray] = {}
    for name in updates[0]:
        stacked = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
        if policy == "median":
            combined = np.median(stacked, axis=0)
        elif policy == "trimmed-mean":
            combined = trim_mean(stacked, trim_fraction)
        else:
            raise ValueError(f"unknown robust policy {policy!r}")
        out[name] = np.asarray(combined).astype(np.asarray(updates[0][name]).dtype)
    return out


def aggregate_by_policy(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    policies: Mapping[str, str],
    trim_fraction: float = 0.2,
) -> dict[str, np.ndarray]:
    """Combine each group of the sites' arrays by its policy (``average`` is sample-weighted).

    Only the arrays the sites sent are combined: local groups and local normalisation
    layers never arrive, and the caller keeps its own values for them.
    """
    split = [split_groups(u) for u in updates]
    out: dict[str, np.ndarray] = {}
    for group in sorted(split[0]) if split else []:
        policy = policies.get(group, "average")
        members = [s[group] for s in split]
        if policy == "average":
            out.update(weighted_mean(members, weights))
        elif policy in COMBINED_POLICIES:
            out.update(coordinate_wise(members, policy, trim_fraction))
        else:
            raise ValueError(f"group {group!r} has policy {policy!r}, which the server cannot combine")
    return out
