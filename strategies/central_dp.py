"""Central (server-side) differential privacy on the aggregate: DP-FedAvg with fixed clipping.

Each site's whole update (all groups, as one vector) is clipped to ``clipping_norm``
around the current global model, the clipped updates are averaged with equal weights (the
sensitivity analysis of DP-FedAvg needs equal weights), and Gaussian noise of std
``noise_multiplier * clipping_norm / n`` is added. Clipping and the std come from
Flower's own helpers; the noise comes from OS entropy unless a seed is given (tests).
This protects each *site's* contribution; DP-SGD at the sites protects each *patient*.
"""

from __future__ import annotations

import secrets
from typing import Mapping, Sequence

import numpy as np
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv


class CentralDP:
    def __init__(self, noise_multiplier: float, clipping_norm: float, seed: int | None = None) -> None:
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.seed = seed
        self.rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self.last_std = 0.0

    def start_round(self, server_round: int) -> None:
        """Seeded (test) noise depends on the round alone, so a resumed run draws the same."""
        if self.seed is not None:
            self.rng = np.random.default_rng([self.seed, server_round])

    def aggregate(
        self, updates: Sequence[Mapping[str, np.ndarray]], current: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        names = sorted(current)
        base = [np.asarray(current[n], dtype=np.float64) for n in names]
        clipped = []
        for update in updates:
            arrays = [np.asarray(update[n], dtype=np.float64) for n in names]
            compute_clip_model_update(arrays, base, self.clipping_norm)
            clipped.append(arrays)
        self.last_std = compute_stdv(self.noise_multiplier, self.clipping_norm, len(updates))
        out = {}
        for i, name in enumerate(names):
            mean = sum(c[i] for c in clipped) / len(clipped)
            noisy = mean + self.rng.normal(0.0, self.last_std, size=mean.shape)
            out[name] = noisy.astype(np.asarray(current[name]).dtype)
        return out
