"""Server-side privacy options from Flower: SecAgg+ and central DP, in real simulated runs; every
run here starts from a public model (``run.initial-model``), the way a DP study is advised to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgan_core.model_file import load_model, save_model
from medgan_core.study_config import StudyConfig
from medgan_core.fileio import read_jsonl
from medgan_core.checkpoints import load_checkpoint
from medgan_core.tasks.registry import build_task, replace_task
from medgan.simulation import simulate_federation

pytestmark = pytest.mark.slow


TASK = {"image_size": 16, "batch_size": 8, "local_steps": 8, "width": 8, "z_dim": 8, "eval_samples": 16,
        "lr_generator": 2e-3, "lr_discriminator": 2e-3}


def _study(public: Path, **privacy: object) -> StudyConfig:
    return StudyConfig().replace(
        run={"rounds": 1, "num_sites": 2, "device": "cpu", "initial_model": str(public)},
        task=TASK,
        privacy={"secure_rng": False, **privacy},
    )


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of the studies' task with other weights than their seeded start."""
    config = StudyConfig().replace(task=TASK).task
    weights = build_task(replace_task(config, seed=7)).get_weights()
    return save_model(tmp_path_factory.mktemp("public") / "public.medgan", weights, config,
                      {"trained-on": "the project's simulator (public phantoms)"})


@pytest.fixture(scope="module")
def plain_run(public: Path, tiny_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain")
    simulate_federation(_study(public), tiny_sites, run_dir)
    return run_dir


def _starts_from(run: Path, public: Path) -> bool:
    start, _ = load_checkpoint(run / "checkpoints" / "round-000.safetensors")
    arrays = load_model(public).arrays
    return set(start) == set(arrays) and all(np.array_equal(start[k], arrays[k]) for k in arrays)


def test_a_study_starts_from_the_initial_model_and_its_export_says_so(plain_run: Path, public: Path,
                                                                     tmp_path: Path) -> None:
    from server.export import export_model
    from server.privacy_report import privacy_report
    from server.run_folder import RunFolder

    assert _starts_from(plain_run, public)
    exported = load_model(export_model(plain_run, tmp_path / "out.medgan"))
    assert exported.provenance["initial-model"]["file"] == "public.medgan"
    assert "public phantoms" in exported.provenance["initial-model"]["trained-on"]
    assert "Starting weights: `public.medgan`" in privacy_report(RunFolder(plain_run))


def test_secagg_gives_the_plain_fedavg_model_up_to_quantisation(
    plain_run: Path, public: Path, tiny_sites: list[Path], tmp_path: Path
) -> None:
    simulate_federation(_study(public, secagg=True), tiny_sites, tmp_path / "secagg")
    assert _starts_from(tmp_path / "secagg", public)  # SecAgg+'s server app starts from it too
    plain, _ = load_checkpoint(plain_run / "checkpoints" / "round-001.safetensors")
    secure, _ = load_checkpoint(tmp_path / "secagg" / "checkpoints" / "round-001.safetensors")
    initial, _ = load_checkpoint(plain_run / "checkpoints" / "round-000.safetensors")
    assert set(plain) == set(secure)
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    moved = max(float(np.abs(plain[k] - initial[k]).max()) for k in plain)
    # Same model as plain FedAvg (SecAgg+ quantises within ±8 after scaling by n/1000), and
    # training moved the weights far more than that error.
    assert worst < 1e-3 and moved > 10 * worst
    records = read_jsonl(tmp_path / "secagg" / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    assert len(records[1]["sites"]) == 2 and all("epsilon" in s["train"] for s in records[1]["sites"])
    assert sorted(s["site"] for s in records[1]["sites"]) == sorted(p.name for p in tiny_sites)  # named, as plain
    assert (tmp_path / "secagg" / "report.md").is_file()


def test_central_dp_adds_noise_to_the_aggregate(plain_run: Path, public: Path, tiny_sites: list[Path],
                                                tmp_path: Path) -> None:
    study = _study(public, central_noise_multiplier=1.0, central_clipping_norm=0.5)
    simulate_federation(study, tiny_sites, tmp_path / "central")
    records = read_jsonl(tmp_path / "central" / "metrics.jsonl")
    assert records[1]["central-noise-std"] == pytest.approx(1.0 * 0.5 / 2)
    plain, _ = load_checkpoint(plain_run / "checkpoints" / "round-001.safetensors")
    noisy, _ = load_checkpoint(tmp_path / "central" / "checkpoints" / "round-001.safetensors")
    diff = np.concatenate([(noisy[k] - plain[k]).ravel() for k in plain])
    assert diff.std() == pytest.approx(0.25, rel=0.1)  # the noise, not clipping, dominates here


def test_a_secagg_reply_is_named_only_by_a_site_label() -> None:
    """The coordinator takes the name a SecAgg+ site's metrics carry only if it is a short label,
    and never counts it as a score."""
    from server.secagg import _site_reply

    named = _site_reply(3, 4, {"epsilon": 1.5, "site-name": "st-mary"})
    assert (named.site, named.metrics, named.num_examples) == ("st-mary", {"epsilon": 1.5}, 4.0)
    assert _site_reply(3, 4, {"epsilon": 1.5, "site-name": "../../etc/passwd"}).site == ""
    assert _site_reply(3, 4, {"epsilon": 1.5}).site == ""
