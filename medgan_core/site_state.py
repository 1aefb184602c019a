"""What a site keeps between rounds: its local arrays and its optimiser state (and its
personal model: after its last round with ``aggregation.finetune-steps``, after every round
with ``ditto-steps``).

One safetensors file per round in ``<state-dir>/state-<study-id>/round-NNN.safetensors``,
written atomically before the site's reply leaves. Training in round r starts from the
newest state of a round before r, so a round the coordinator runs again after a crash
starts from exactly the state it started from the first time (a resumed run ends with
the weights of an uninterrupted one). The accountant is kept beside it
(``medgan_core.site_round``). Nothing here ever leaves the site.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from medgan_core.checkpoints import safetensors_metadata
from medgan_core.errors import MedGANError
from medgan_core.fileio import atomic_write_bytes

KEEP_ROUNDS = 3  # older files are removed; a resumed round needs only the one before it
LOCAL, OPTIMIZER, PERSONAL = "local:", "optimizer:", "personal:"
PERSONAL_STEPS = "personal-steps"
_ROUND_FILE = re.compile(r"round-(\d+)\.safetensors$")


@dataclass
class SavedState:
    server_round: int
    local: dict[str, np.ndarray] = field(default_factory=dict)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    #: Every array of the site's personal model (fine-tuned: only in the last round's state; Ditto: every round's).
    personal: dict[str, np.ndarray] = field(default_factory=dict)
    #: The fine-tune steps that model took (Ditto: its steps a round; fewer than planned where a validation check chose
    #: an earlier one; None: a state written before this was recorded).
    personal_steps: int | None = None

    def personal_for(self, server_round: int, every_round: bool) -> dict[str, np.ndarray] | None:
        """The personal model to evaluate or export round ``server_round`` with (None: none): a
        fine-tuned one only from that round's own state; one trained ``every_round`` (Ditto),
        the latest, also for a round the site sat out."""
        if self.personal and (self.server_round == server_round or every_round):
            return self.personal
        return None


class SiteState:
    def __init__(self, state_dir: str | Path, study_id: str) -> None:
        if not str(state_dir):
            raise MedGANError("this study keeps weights or optimiser state at each site, but the site has no state-dir")
        self.folder = Path(state_dir) / f"state-{study_id}"

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:03d}.safetensors"

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _ROUND_FILE.match(p.name)))

    def save(self, server_round: int, local: Mapping[str, np.ndarray], optimizer: Mapping[str, np.ndarray],
             personal: Mapping[str, np.ndarray] | None = None, personal_steps: int | None = None) -> Path:
        arrays = {LOCAL + k: np.ascontiguousarray(v) for k, v in local.items()}
        arrays.update({OPTIMIZER + k: np.ascontiguousarray(v) for k, v in optimizer.items()})
        arrays.update({PERSONAL + k: np.ascontiguousarray(v) for k, v in (personal or {}).items()})
        metadata = {"round": json.dumps(server_round)}
        if personal and personal_steps is not None:
            metadata[PERSONAL_STEPS] = json.dumps(personal_steps)
        data = st_save(arrays, metadata=metadata)
        path = atomic_write_bytes(self.path(server_round), data)
        for old in self.rounds()[:-KEEP_ROUNDS]:
            self.path(old).unlink(missing_ok=True)
        return path

    def latest(self, *, before: int) -> SavedState | None:
        """The newest state saved for a round earlier than ``before`` (None: none yet)."""
        earlier = [r for r in self.rounds() if r < before]
        if not earlier:
            return None
        path = self.path(earlier[-1])
        try:
            data = path.read_bytes()
            arrays = st_load(data)
            steps = safetensors_metadata(data).get(PERSONAL_STEPS)
            personal_steps = int(json.loads(steps)) if steps is not None else None
        except (SafetensorError, ValueError, TypeError, OSError) as exc:
            raise MedGANError(f"site state {path} is unreadable ({exc}); move it away to start this site afresh") from exc
        return SavedState(
            earlier[-1],
            {k[len(LOCAL):]: v for k, v in arrays.items() if k.startswith(LOCAL)},
            {k[len(OPTIMIZER):]: v for k, v in arrays.items() if k.startswith(OPTIMIZER)},
            {k[len(PERSONAL):]: v for k, v in arrays.items() if k.startswith(PERSONAL)},
            personal_steps,
        )

