"""A site's privacy accountant, persisted in its state folder across rounds and restarts.

The accountant is Opacus' own (RDP or PRV); we only keep its history — a list of
(noise multiplier, sample rate, steps) — in a JSON file written atomically after each
round. A site that restarts reads the file and continues; it never starts again at ε = 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from opacus.accountants import IAccountant, create_accountant

from medgan_core.errors import PrivacyError
from medgan_core.fileio import atomic_write_text


class SiteAccountant:
    """Tracks the ε a site has spent on one study."""

    def __init__(self, mechanism: str = "rdp", delta: float = 1e-5, path: str | Path | None = None) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.path = Path(path) if path is not None else None
        self._accountant: IAccountant = create_accountant(mechanism)
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            history = [tuple(entry) for entry in state["history"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyError(
                f"privacy accountant {self.path} is unreadable ({exc}); refusing to train with an unknown ε spent"
            ) from exc
        if state.get("mechanism") != self.mechanism:
            raise PrivacyError(
                f"{self.path} was kept by a {state.get('mechanism')!r} accountant, this study uses {self.mechanism!r}"
            )
        self._accountant.history = history

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._accountant.history)

    @property
    def steps(self) -> int:
        return sum(int(steps) for _, _, steps in self._accountant.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        """ε spent so far at this accountant's δ (0 before any step)."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.delta))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the site would have spent after ``steps`` more steps (nothing is recorded)."""
        projected = copy.deepcopy(self._accountant)
        for _ in range(steps):
            projected.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return float(projected.get_epsilon(delta=self.delta))

    def save(self) -> None:
        if self.path is None:
            return
        state = {"mechanism": self.mechanism, "delta": self.delta, "history": self.history,
                 "steps": self.steps, "epsilon": self.epsilon()}
        atomic_write_text(self.path, json.dumps(state, indent=2))
