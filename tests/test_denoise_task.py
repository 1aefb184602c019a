"""Low-dose CT denoising: paired data from the simulator, a model that beats its input, DP on both networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation_checks import site_without
from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.data import read_manifest
from medgan_core.errors import DataError
from medgan_core.site_round import train_site_round
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, replace_task, task_config

CONFIG = task_config(name="denoise", image_size=32, width=8, batch_size=8, local_steps=3, lr_generator=2e-3,
                    lr_discriminator=2e-3)


def test_simulator_writes_paired_quarter_dose_series(tiny_sites: list[Path]) -> None:
    manifest = read_manifest(tiny_sites[0])
    full = {e.pair_id: e for e in manifest.select(modality="CT")}
    low = {e.pair_id: e for e in manifest.select(modality="CT", variant="low-dose")}
    assert full.keys() == low.keys() and all(e.domain.endswith("-low-dose") for e in low.values())
    key = sorted(full)[0]
    full_hu, low_hu = manifest.load(full[key]).axial_slices(), manifest.load(low[key]).axial_slices()
    body = (full_hu > -200) & (full_hu < 200)
    assert np.std((low_hu - full_hu)[body]) > 5  # quarter dose: visibly noisier …
    assert abs(np.median(low_hu[body]) - np.median(full_hu[body])) < 15  # … of the same anatomy


def test_pairs_load_slice_for_slice(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    assert data.train_input is not None and data.test_input is not None
    assert data.train_input.shape == data.train.shape and data.test_input.shape == data.test.shape
    assert data.num_train == 5 * 4  # 5 training subjects x 4 slices


def test_missing_low_dose_partner_is_a_clear_error(tmp_path: Path, tiny_sites: list[Path]) -> None:
    site = site_without(tiny_sites[0], tmp_path, "low-dose")
    with pytest.raises(DataError, match="no train pairs of low-dose and full-dose CT"):
        load_task_data(site, CONFIG)


def test_denoiser_beats_its_low_dose_input(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    task = build_task(CONFIG)
    before = task.evaluate(data)
    assert before["psnr"] == pytest.approx(before["psnr-input"], abs=1e-6)  # starts as the identity
    task.train(data, steps=60, seed=0)
    after = task.evaluate(data)
    assert after["psnr"] > after["psnr-input"] + 1.0
    assert after["ssim"] > after["ssim-input"] and after["mae-hu"] < before["mae-hu"]


def test_dp_covers_both_networks_and_counts_one_joint_release_per_step(tiny_sites: list[Path], tmp_path: Path) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    task = build_task(CONFIG)
    before = task.get_weights()
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0)
    metrics = train_site_round(task, data, SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path)), privacy,
                               planned_rounds=1, study_id="d", seed=0)
    assert metrics["dp-steps"] == CONFIG.local_steps  # G and D on one batch: one joint release (σ/√2) per step
    after = task.get_weights()
    for group in ("generator", "discriminator"):
        assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith(group))


def test_preview_rows_are_input_output_target_from_phantoms() -> None:
    task = build_task(replace_task(CONFIG, spacing=3.125))
    grid = task.preview(2)
    assert grid.shape == (6, 1, 128, 128)  # whole phantom slices (400 mm) at the task's 3.125 mm
    assert np.allclose(grid[0].numpy(), grid[1].numpy(), atol=1e-5)  # untrained: output = input (tiles blended)
    assert not np.allclose(grid[0].numpy(), grid[2].numpy())  # low dose differs from full dose


def test_the_coordinator_makes_its_preview_phantoms_once_and_shows_each_rounds_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    task = build_task(replace_task(CONFIG, spacing=6.25))
    made: list[int] = []
    make = task.preview_pairs
    monkeypatch.setattr(task, "preview_pairs", lambda n: (made.append(n), make(n))[1])
    untrained = task.preview(2)
    weights = task.get_weights()
    task.set_weights({k: v + 0.05 if k.startswith("generator.") else v for k, v in weights.items()})
    changed = task.preview(2)
    assert made == [2]  # the phantoms once
    assert torch.equal(untrained[2::3], changed[2::3]) and torch.equal(untrained[0::3], changed[0::3])
    assert not torch.allclose(untrained[1::3], changed[1::3])  # the output column is the new model's
    assert task.preview(3).shape[0] == 9 and made == [2, 3]  # another number: made again


def test_fully_convolutional_on_a_clinical_size_slice() -> None:
    task = build_task(CONFIG)
    assert task.denoise(torch.zeros(1, 1, 512, 512)).shape == (1, 1, 512, 512)


@pytest.mark.slow
def test_denoise_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="denoise", image_size=16)
    assert {"psnr", "ssim", "mae-hu", "psnr-input"} <= set(records[2]["evaluate"])
    assert all({"psnr", "mae-hu"} <= set(m) for m in site_metrics(records))


def test_dihedral_pairs_turn_input_and_target_alike() -> None:
    import torch

    from medgan_core.data.augment import dihedral_pairs

    rng = torch.Generator().manual_seed(0)
    low = torch.randn(64, 1, 8, 8, generator=rng)
    low_out, full_out = dihedral_pairs(low, 3 * low, generator=torch.Generator().manual_seed(1))
    assert torch.equal(full_out, 3 * low_out)  # the same transform for both, record by record
    symmetries = [torch.rot90(x, k, dims=(-2, -1)) for x in (low, low.flip(-1)) for k in range(4)]
    used = {next(i for i, s in enumerate(symmetries) if torch.equal(low_out[r], s[r])) for r in range(64)}
    assert used == set(range(8))  # each output is a symmetry of its input, and all 8 occur
    with pytest.raises(ValueError, match="square"):
        dihedral_pairs(low[:, :, :, :4], generator=rng)


def test_denoise_trains_on_turned_pairs_and_recon_does_not(tiny_sites: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import medgan_core.tasks.paired as paired

    calls = []
    original = paired.dihedral_pairs
    monkeypatch.setattr(paired, "dihedral_pairs", lambda *b, generator: calls.append(len(b[0])) or original(*b, generator=generator))
    build_task(CONFIG).train(load_task_data(tiny_sites[1], CONFIG), steps=2, seed=0)
    assert calls == [CONFIG.batch_size] * 2
    recon = task_config(name="recon", modality="MR", image_size=32, width=8, batch_size=8)
    build_task(recon).train(load_task_data(tiny_sites[1], recon), steps=2, seed=0)
    assert len(calls) == 2  # k-space inputs are not turned: their mask channel is not an image


def test_denoise_restores_by_self_ensemble_so_a_turned_slice_gives_the_turned_output() -> None:
    import torch

    task = build_task(CONFIG)
    with torch.no_grad():  # a model far from the identity, so that turning the input matters
        for p in task.generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    turned = torch.rot90(x, 1, dims=(-2, -1))
    assert torch.allclose(task.restore(turned), torch.rot90(task.restore(x), 1, dims=(-2, -1)), atol=1e-5)
    plain = task.generator.eval()(turned).clamp(-1, 1)
    assert not torch.allclose(plain, torch.rot90(task.generator(x).clamp(-1, 1), 1, dims=(-2, -1)), atol=1e-3)


def test_some_training_patches_fall_on_the_air_around_the_patient(tiny_sites: list[Path]) -> None:
    """The denoiser must learn to flatten the noise in the air too (whole slices are restored
    tile by tile): a share of its patches is drawn anywhere, most still on the body."""
    import torch

    config = replace_task(CONFIG, image_size=16)
    data = load_task_data(tiny_sites[0], config)
    task = build_task(config)
    idx = torch.arange(len(data.train)).repeat(10)
    _, full = task.training_pair(data, idx, torch.Generator().manual_seed(0))
    on_body = float(full[:, 0, 8, 8].gt(task.body_level).float().mean())
    assert 0.6 < on_body < 0.97


def test_self_ensemble_off_restores_in_one_pass_of_the_generator() -> None:
    """``task.self-ensemble = false`` (the demo's): one pass per slice, the generator's own output."""
    task = build_task(replace_task(CONFIG, self_ensemble=False))
    with torch.no_grad():  # far from the identity, so the ensemble would differ
        for p in task.generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        plain = task.generator.eval()(x).clamp(-1, 1)
    assert torch.allclose(task.restore(x), plain, atol=1e-6)
    default = build_task(CONFIG)  # the same weights: the default still averages 8 views
    default.generator.load_state_dict(task.generator.state_dict())
    assert default.self_ensemble and not torch.allclose(default.restore(x), plain, atol=1e-3)


def test_eval_slices_scores_that_many_evenly_spaced_held_out_slices(tiny_sites: list[Path]) -> None:
    import dataclasses

    config = replace_task(CONFIG, self_ensemble=False)
    data = load_task_data(tiny_sites[0], config)
    n = len(data.test)
    assert n >= 4
    whole = build_task(config).evaluate(data)
    few = build_task(replace_task(config, eval_slices=3)).evaluate(data)
    rows = [0, round((n - 1) / 2), n - 1]
    subset = dataclasses.replace(data, test=data.test[rows], test_input=data.test_input[rows],
                                 test_series=torch.tensor([3]))
    assert few == pytest.approx(build_task(config).evaluate(subset))
    assert few["psnr-input"] != pytest.approx(whole["psnr-input"])  # not all slices scored
    assert build_task(replace_task(config, eval_slices=n + 5)).evaluate(data) == pytest.approx(whole)


def test_eval_slices_scores_recon_s_whole_slices_the_same_way(tiny_sites: list[Path]) -> None:
    """recon (MR, scored outside the clinical CT path): the chosen rows' scores, NMSE included."""
    import dataclasses

    recon = task_config(name="recon", modality="MR", image_size=32, width=8)
    data = load_task_data(tiny_sites[1], recon)
    n = len(data.test)
    few = build_task(replace_task(recon, eval_slices=2)).evaluate(data)
    subset = dataclasses.replace(data, test=data.test[[0, n - 1]], test_input=data.test_input[[0, n - 1]],
                                 test_series=None)
    assert "nmse" in few and few == pytest.approx(build_task(recon).evaluate(subset))
    assert few["psnr-input"] != pytest.approx(build_task(recon).evaluate(data)["psnr-input"])


def test_eval_slices_must_not_be_negative() -> None:
    from medgan_core.errors import ConfigError

    with pytest.raises(ConfigError, match="task.eval-slices = -1"):
        replace_task(CONFIG, eval_slices=-1)
