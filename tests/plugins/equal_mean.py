"""An aggregation policy written outside MedGAN-FL, in one file: every site counts the same,
whatever its size. Registered with one line, ``equal-mean = "equal_mean:EqualMean"`` in the
entry-point group ``medgan.policies``."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medgan_core.policies.base import Arrays, CombinePolicy
from medgan_core.policies.mean import weighted_mean


class EqualMean(CombinePolicy):
    name = "equal-mean"
    linear = True

    def combine(self, updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
        return weighted_mean(updates, [1.0] * len(updates))

    def describe(self) -> str:
        return "unweighted mean (every site counts once)"
