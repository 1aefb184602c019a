"""What the per-task tests share: one federated run of a task on the tiny sites with the
checks every such test makes (per-site metrics, DP steps, the aggregate as the weighted
mean, a grid), and a copy of a site with some of its series taken out of the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from medgan_core.study_config import StudyConfig
from medgan_core.fileio import read_jsonl
from medgan_core.checkpoints import load_checkpoint
from medgan.simulation import simulate_federation


def run_paired_task(sites: list[Path], run_dir: Path, **task: Any) -> list[dict[str, Any]]:
    """2 sites × 2 rounds of ``task`` (DP on, seeded); returns the metrics lines after checking
    the accounted DP steps (one joint release of G and D per step), that round 2's aggregate
    is the sample-weighted mean of the replies and that a grid was written."""
    study = StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu"},
        task={"batch_size": 8, "local_steps": 3, "width": 8, **task},
        privacy={"secure_rng": False},
    )
    received: dict[int, list[Message]] = {}
    simulate_federation(study, sites, run_dir, on_train_replies=lambda rnd, replies: received.__setitem__(rnd, replies))
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert all(s["train"]["dp-steps"] == 2 * 3 for s in records[2]["sites"])  # 2 rounds x 3 steps
    updates = [({k: v.numpy() for k, v in m.content["arrays"].items()}, float(m.content["metrics"]["num-examples"]))
               for m in received[2]]
    start, _ = load_checkpoint(run_dir / "checkpoints" / "round-000.safetensors")
    final, _ = load_checkpoint(run_dir / "checkpoints" / "round-002.safetensors")
    total = sum(w for _, w in updates)
    for name, value in final.items():
        np.testing.assert_allclose(value, sum(u[name] * w for u, w in updates) / total, rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(start[n], final[n]) for n in final)
    assert (run_dir / "samples" / "round-002.png").is_file()
    return records


def site_without(site: Path, tmp_path: Path, marker: str) -> Path:
    """A copy of ``site`` whose manifest lists no line containing ``marker``."""
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    lines = (copy / "manifest.csv").read_text().splitlines()
    (copy / "manifest.csv").write_text("\n".join(line for line in lines if marker not in line) + "\n")
    return copy


def site_metrics(records: list[dict[str, Any]], server_round: int = 2) -> list[dict[str, float]]:
    """Every site's held-out metrics of a round (finite, or the assertion names the site)."""
    metrics = [site["evaluate"] for site in records[server_round]["sites"]]
    assert len(metrics) == 2 and all(np.isfinite(v) for m in metrics for v in m.values()), metrics
    return metrics
