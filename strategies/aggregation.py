"""Combining named arrays across sites, per parameter group, each group by its policy
(``medgan_core.policies``). numpy only; no torch."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medgan_core.arrays import group_of
from medgan_core.policies.base import PolicySettings
from medgan_core.policies.mean import weighted_mean
from medgan_core.policies.registry import policy_class

__all__ = ["aggregate_by_group", "aggregate_by_policy", "split_groups", "weighted_mean"]


def split_groups(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{"generator.a": x, "discriminator.b": y}`` -> ``{"generator": {...}, "discriminator": {...}}``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        groups.setdefault(group_of(name), {})[name] = array
    return groups


def aggregate_by_group(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], groups: Sequence[str]
) -> dict[str, np.ndarray]:
    """Average each named group separately; every group must be present in every update."""
    split = [split_groups(u) for u in updates]
    out: dict[str, np.ndarray] = {}
    for group in groups:
        out.update(weighted_mean([s[group] for s in split], weights))
    return out


def aggregate_by_policy(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    policies: Mapping[str, str],
    settings: PolicySettings,
) -> dict[str, np.ndarray]:
    """Combine each group of the sites' arrays by its policy (a group not named: ``average``).

    Only the arrays the sites sent are combined: local groups and local normalisation
    layers never arrive, and the caller keeps its own values for them.
    """
    split = [split_groups(u) for u in updates]
    out: dict[str, np.ndarray] = {}
    for group in sorted(split[0]) if split else []:
        policy = policy_class(policies.get(group, "average"))(settings)
        out.update(policy.combine([s[group] for s in split], weights))
    return out
