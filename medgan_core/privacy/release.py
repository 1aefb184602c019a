"""What a site released for each round, kept so that a repeated round is not a new release.

After a coordinator crash a round may be asked for again. Training again would be a
second DP release of the same round, charged twice and possibly pushing the site over
its budget. Instead the site keeps the update it released for (study, round) in
``<state-dir>/released-<study-id>/round-NNN.safetensors`` and sends that copy again:
re-sending something already released costs no privacy. The accountant records the
file's digest when it is saved (``SiteAccountant.released``), so only an update that was
accounted before it left is ever re-sent.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from medgan_core.checkpoints import safetensors_metadata
from medgan_core.errors import PrivacyError
from medgan_core.fileio import atomic_write_bytes

KEEP_RELEASES = 3  # a resumed study repeats only its last round
_ROUND_FILE = re.compile(r"round-(\d+)\.safetensors$")


class ReleaseStore:
    def __init__(self, state_dir: str | Path, study_id: str) -> None:
        self.folder = Path(state_dir) / f"released-{study_id}"

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:03d}.safetensors"

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float]) -> str:
        """Keep the update and its metrics; returns the file's digest for the accountant."""
        data = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                       metadata={"round": str(server_round), "metrics": json.dumps(dict(metrics), sort_keys=True)})
        atomic_write_bytes(self.path(server_round), data)
        return hashlib.sha256(data).hexdigest()

    def load(self, server_round: int, digest: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The update released for ``server_round``; refuses a copy that is missing or altered."""
        path = self.path(server_round)
        try:
            data = path.read_bytes()
        except OSError:
            raise PrivacyError(f"round {server_round} was already released by this site, but its copy {path} is "
                               "gone; refusing to train it again (that would charge the round twice)") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise PrivacyError(f"the copy of round {server_round}'s released update ({path}) was altered; refusing "
                               "to send it or to train the round again")
        try:
            arrays = st_load(data)
            metadata = safetensors_metadata(data)
            metrics = {k: float(v) for k, v in json.loads(metadata["metrics"]).items()}
        except (SafetensorError, ValueError, KeyError) as exc:
            raise PrivacyError(f"the copy of round {server_round}'s released update ({path}) is unreadable") from exc
        return arrays, metrics

    def prune(self) -> None:
        if not self.folder.is_dir():
            return
        rounds = sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _ROUND_FILE.match(p.name)))
        for old in rounds[:-KEEP_RELEASES]:
            self.path(old).unlink(missing_ok=True)
