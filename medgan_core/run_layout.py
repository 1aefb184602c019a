"""Where a run keeps each of its files: the one definition of a run folder's layout.

The coordinator writes most of them (``server.run_folder.RunFolder`` adds the operations);
in simulation each site's state lives in the run folder too (``site_state``). Nothing
else builds these paths by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def privacy_report(self) -> Path:
        return self.root / "privacy-report.md"

    @property
    def study_id_file(self) -> Path:
        return self.root / "study-id"

    @property
    def lock_file(self) -> Path:
        """Beside the folder, not in it: archiving renames the folder, the lock must stay put."""
        return self.root.parent / f".{self.root.name}.lock"

    def checkpoint(self, server_round: int) -> Path:
        return self.root / "checkpoints" / f"round-{server_round:03d}.safetensors"

    def server_optimizer(self, server_round: int) -> Path:
        """FedAdam/FedYogi moments after a round: a resumed run needs them to go on exactly."""
        return self.root / "checkpoints" / f"round-{server_round:03d}.server-optimizer.safetensors"

    def samples(self, server_round: int) -> Path:
        return self.root / "samples" / f"round-{server_round:03d}.png"

    def site_state(self, site_name: str) -> Path:
        """A simulated site's state folder (accountant, ledger, kept arrays, released updates)."""
        return self.root / "site-state" / site_name
