"""CT super-resolution (×2, ×4): coarse-grid series from the simulator, bicubic input, a GAN that beats it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation_checks import site_without
from medgan_core.data import read_manifest
from medgan_core.data.simulate import coarse_grid
from medgan_core.errors import ConfigError, DataError
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, replace_task, task_config

CONFIG = task_config(name="superres", image_size=32, width=8, batch_size=8, local_steps=3, lr_generator=2e-3,
                    lr_discriminator=2e-3, scale=2)


@pytest.mark.parametrize("scale", [2, 4])
def test_simulator_writes_coarse_grid_series_of_the_same_acquisition(tiny_sites: list[Path], scale: int) -> None:
    manifest = read_manifest(tiny_sites[0])
    full = {e.pair_id: e for e in manifest.select(modality="CT")}
    coarse = {e.pair_id: e for e in manifest.select(modality="CT", variant=f"low-res-x{scale}")}
    assert full.keys() == coarse.keys()
    key = sorted(full)[0]
    full_volume, coarse_volume = manifest.load(full[key]), manifest.load(coarse[key])
    assert coarse_volume.axial_slices().shape[1:] == tuple(s // scale for s in full_volume.axial_slices().shape[1:])
    np.testing.assert_allclose(np.diag(coarse_volume.affine)[:2], np.diag(full_volume.affine)[:2] * scale, rtol=1e-4)
    expected = coarse_grid(full_volume.axial_slices(), scale)
    assert np.abs(coarse_volume.axial_slices() - expected).max() <= 1.0  # the DICOM integer HU rounding


def test_inputs_are_bicubic_interpolations_of_the_coarse_grid(tiny_sites: list[Path]) -> None:
    x2 = load_task_data(tiny_sites[0], CONFIG)
    x4 = load_task_data(tiny_sites[0], replace_task(CONFIG, **{"scale": 4}))
    assert x2.train_input is not None and x4.train_input is not None
    assert x2.train_input.shape == x2.train.shape == x4.train_input.shape
    torch.testing.assert_close(x2.train, x4.train)  # same targets …
    error = lambda d: float((d.train_input - d.train).abs().mean())  # noqa: E731
    assert 0 < error(x2) < error(x4)  # … coarser inputs are further from them
    with pytest.raises(ConfigError, match="task.scale = 3"):
        task_config(name="superres", scale=3)
    assert x2.train.shape[-2:] == (128, 128)  # the original grid (spacing 0): whole slices, not image-size
    coarser = load_task_data(tiny_sites[0], replace_task(CONFIG, spacing=6.25))
    assert coarser.train.shape[-2:] == (64, 64)  # resampled to 6.25 mm over the same 400 mm


def test_missing_low_res_partner_is_a_clear_error(tmp_path: Path, tiny_sites: list[Path]) -> None:
    site = site_without(tiny_sites[0], tmp_path, "low-res-x2")
    with pytest.raises(DataError, match="no train pairs of low-res-x2 and original CT"):
        load_task_data(site, CONFIG)


def test_super_resolution_beats_bicubic(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    task = build_task(CONFIG)
    before = task.evaluate(data)
    assert before["psnr"] == pytest.approx(before["psnr-input"], abs=1e-6)  # starts as bicubic
    task.train(data, steps=60, seed=0)
    after = task.evaluate(data)
    # the noisiest site: its full-dose target holds noise that no input predicts, so the gain is small
    assert after["psnr"] > after["psnr-input"] + 0.3
    assert after["ssim"] > after["ssim-input"] and after["mae-hu"] < after["mae-hu-input"]
    assert before["mae-hu"] == pytest.approx(before["mae-hu-input"], rel=1e-5)


def test_preview_and_clinical_size() -> None:
    task = build_task(replace_task(CONFIG, spacing=3.125))
    grid = task.preview(2)
    assert grid.shape == (6, 1, 128, 128)  # whole phantom slices (400 mm) at the task's 3.125 mm
    assert np.allclose(grid[0].numpy(), grid[1].numpy(), atol=1e-5)  # untrained: output = bicubic input (tiles blended)
    assert not np.allclose(grid[0].numpy(), grid[2].numpy())
    assert task.restore(torch.zeros(1, 1, 512, 512)).shape == (1, 1, 512, 512)


@pytest.mark.slow
def test_superres_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from PIL import Image

    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="superres", image_size=32, scale=4, spacing=6.25)
    assert all({"psnr", "ssim", "mae-hu", "psnr-input"} <= set(m) for m in site_metrics(records))
    grid = Image.open(tmp_path / "run" / "samples" / "round-002.png")
    # 4 rows of input | output | target: whole 400 mm phantom slices at the task's 6.25 mm, shown twice as large
    assert grid.size == (2 * (3 * (64 + 2) + 2), 2 * (4 * (64 + 2) + 2))
