"""Robust, unweighted coordinate-wise policies: ``median`` and ``trimmed-mean``. A single
bad site cannot drag such a group arbitrarily far, unlike a mean."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import trim_mean

from medgan_core.policies.base import Arrays, CombinePolicy, same_dtype, stacked


class Median(CombinePolicy):
    name = "median"

    def combine(self, updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
        if not updates:
            raise ValueError("no updates to combine")
        return {name: same_dtype(np.median(stacked(updates, name), axis=0), updates, name) for name in updates[0]}

    def describe(self) -> str:
        return "coordinate-wise median"


class TrimmedMean(CombinePolicy):
    """Drops ``trim-fraction`` of the sites at each end of every coordinate (SciPy's trim_mean,
    which Flower's FedTrimmedAvg copies)."""

    name = "trimmed-mean"

    def combine(self, updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
        if not updates:
            raise ValueError("no updates to combine")
        cut = self.settings.trim_fraction
        return {name: same_dtype(trim_mean(stacked(updates, name), cut, axis=0), updates, name) for name in updates[0]}

    def describe(self) -> str:
        return f"coordinate-wise trimmed mean ({self.settings.trim_fraction:g} cut at each end)"
