"""A site's privacy accountant, persisted in its state folder across rounds and restarts.

The accountant is Opacus' own (RDP or PRV); we only keep its history — a list of
(noise multiplier, sample rate, steps) — in a JSON file written atomically after each
round, sealed by the site's ledger (``medgan_core.privacy.ledger``). A site that
restarts reads the file and continues; it never starts again at ε = 0, and a file that
was deleted, edited or put back from an older copy stops it. The file also records
which rounds' updates were released, so a round the coordinator asks for again is
answered with the same update instead of a new, charged one (``medgan_core.privacy.release``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from opacus.accountants import IAccountant, create_accountant

from medgan_core.errors import PrivacyError
from medgan_core.fileio import atomic_write_text
from medgan_core.privacy.ledger import Ledger

ACCOUNTANT_PREFIX = "accountant-"


class SiteAccountant:
    """Tracks the ε a site has spent on one study."""

    def __init__(self, mechanism: str = "rdp", delta: float = 1e-5, path: str | Path | None = None) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.path = Path(path) if path is not None else None
        self._accountant: IAccountant = create_accountant(mechanism)
        self.released: dict[int, str] = {}  # server round -> digest of the update released for it
        self.ledger = Ledger(self.path.parent) if self.path is not None else None
        if self.path is not None:
            self._load()

    @property
    def study_id(self) -> str:
        assert self.path is not None
        return self.path.stem.removeprefix(ACCOUNTANT_PREFIX)

    def _load(self) -> None:
        assert self.path is not None and self.ledger is not None
        studies = self.ledger.studies()  # a damaged or missing index fails here
        recorded = studies.get(self.study_id)
        if not self.path.exists():
            if recorded is not None:
                raise PrivacyError(
                    f"privacy accountant {self.path} is missing, but this site has trained in study {self.study_id} "
                    f"({recorded} DP steps); refusing to train with an unknown ε spent. Restore it from the backup")
            return
        try:
            signed = json.loads(self.path.read_text(encoding="utf-8"))
            state = self.ledger.verify(signed, f"privacy accountant {self.path}")
            history = [tuple(entry) for entry in state["history"]]
            released = {int(k): str(v) for k, v in dict(state.get("released", {})).items()}
        except PrivacyError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PrivacyError(
                f"privacy accountant {self.path} is unreadable ({exc}); refusing to train with an unknown ε spent"
            ) from exc
        if state.get("mechanism") != self.mechanism:
            raise PrivacyError(
                f"{self.path} was kept by a {state.get('mechanism')!r} accountant, this study uses {self.mechanism!r}"
            )
        if state.get("study") != self.study_id:
            raise PrivacyError(f"{self.path} belongs to study {state.get('study')!r}; refusing to use it for another")
        self._accountant.history = history
        self.released = released
        if recorded is None or self.steps < recorded:
            raise PrivacyError(
                f"privacy accountant {self.path} records {self.steps} DP steps, the ledger at least "
                f"{recorded or 'none'}: it was put back from an older copy or planted; refusing to train")

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
        """Write the sealed accountant, then raise the ledger's step count for this study (a
        crash between the two leaves the ledger behind the file, which is still consistent)."""
        if self.path is None or self.ledger is None:
            return
        state = {"mechanism": self.mechanism, "delta": self.delta, "study": self.study_id,
                 "history": [list(entry) for entry in self.history], "steps": self.steps, "epsilon": self.epsilon(),
                 "released": {str(k): v for k, v in sorted(self.released.items())}}
        mac = self.ledger.mac(state, create=True)
        if self.study_id not in self.ledger.studies():
            self.ledger.record(self.study_id, 0)  # the index knows the study before its file exists
        atomic_write_text(self.path, json.dumps({**state, "mac": mac}, indent=2))
        self.ledger.record(self.study_id, self.steps)
