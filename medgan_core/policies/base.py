"""The contract of an aggregation policy."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Protocol, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


class PolicySettings(Protocol):
    """What of ``[aggregation]`` a policy may read."""

    trim_fraction: float


class CombinePolicy(ABC):
    """Combines one parameter group's arrays from several sites into one set of arrays."""

    name: ClassVar[str]
    #: A (sample-weighted) mean of the updates: computable from their sum, so it works under
    #: secure aggregation, and what central DP's noise is calibrated for.
    linear: ClassVar[bool] = False

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings

    @abstractmethod
    def combine(self, updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
        """One array per name from every site's arrays of the group (same names and shapes);
        ``weights`` are the sites' training-example counts."""

    @abstractmethod
    def describe(self) -> str:
        """A few words for the study report, e.g. ``coordinate-wise median``."""


def stacked(updates: Sequence[Arrays], name: str) -> np.ndarray:
    """The sites' arrays called ``name`` stacked along a new first axis, in float64."""
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def same_dtype(combined: np.ndarray, updates: Sequence[Arrays], name: str) -> np.ndarray:
    return np.asarray(combined).astype(np.asarray(updates[0][name]).dtype)
