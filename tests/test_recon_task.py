"""Compressed-sensing MR reconstruction: undersampled k-space on disk, data consistency, a GAN
that beats the zero-filled inverse FFT."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgan_core.data import read_manifest
from medgan_core.data.kspace import acquired_columns, crop_kspace, read_kspace
from medgan_core.errors import ConfigError, DataError
from medgan_core.models.unet import DataConsistentUNet
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, task_config

CONFIG = task_config(name="recon", modality="MR", image_size=32, width=8, batch_size=8, local_steps=3,
                    lr_generator=2e-3, lr_discriminator=2e-3, acceleration=4)


def _masks(site: Path, acceleration: int) -> list[np.ndarray]:
    manifest = read_manifest(site)
    return [acquired_columns(read_kspace(site / e.file))
            for e in manifest.select(modality="MR", variant=f"kspace-r{acceleration}")]


@pytest.mark.parametrize("acceleration", [4, 10])
def test_simulator_writes_undersampled_kspace_of_the_mr_image(tiny_sites: list[Path], acceleration: int) -> None:
    manifest = read_manifest(tiny_sites[0])
    image = {e.pair_id: e for e in manifest.select(modality="MR")}
    raw = {e.pair_id: e for e in manifest.select(modality="MR", variant=f"kspace-r{acceleration}")}
    assert image.keys() == raw.keys()
    key = sorted(image)[0]
    kspace = read_kspace(tiny_sites[0] / raw[key].file)
    slices = manifest.load(image[key]).axial_slices()
    mask = acquired_columns(kspace)
    assert mask.mean() == pytest.approx(1 / acceleration, abs=0.02)
    assert mask[0]  # the k-space centre (np.fft order) is always acquired
    full = np.fft.fft2(slices, norm="ortho")
    np.testing.assert_allclose(kspace[..., mask], full[..., mask], rtol=1e-4, atol=1e-2 * np.abs(full).max() * 1e-3)
    assert np.all(kspace[..., ~mask] == 0)


def test_each_site_has_its_own_sampling_pattern(tiny_sites: list[Path]) -> None:
    a, c = _masks(tiny_sites[0], 4), _masks(tiny_sites[1], 4)
    assert all(np.array_equal(a[0], m) for m in a)  # one protocol per site …
    assert not np.array_equal(a[0], c[0])  # … that differs between sites (non-IID)


def test_kspace_reader_refuses_a_real_valued_file(tmp_path: Path) -> None:
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="k-space must be complex"):
        read_kspace(path)
    with pytest.raises(DataError, match="does not exist"):
        read_kspace(tmp_path / "missing.nii.gz")


def test_kspace_cropping_keeps_intensity_and_resamples_exactly() -> None:
    yy, xx = np.mgrid[:64, :64]
    smooth = np.cos(2 * np.pi * 3 * xx / 64) + np.sin(2 * np.pi * 5 * yy / 64) + 2.0  # band-limited
    small = crop_kspace(smooth[None], 32).real[0]
    y2, x2 = np.mgrid[:32, :32]
    np.testing.assert_allclose(small, np.cos(2 * np.pi * 3 * x2 / 32) + np.sin(2 * np.pi * 5 * y2 / 32) + 2.0, atol=1e-9)
    with pytest.raises(DataError, match="larger than"):
        crop_kspace(smooth[None], 128)


def test_data_consistency_keeps_every_measured_line(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.train_input is not None and data.train_input.shape[1:] == (3, 32, 32)
    net = DataConsistentUNet(8)
    torch.nn.init.normal_(net.unet.out.weight, std=0.5)  # an untrained network that changes things
    with torch.no_grad():
        image = net.complex_image(data.train_input)
        shown = net(data.train_input)
    measured = torch.complex((data.train_input[:, 0] + 1) / 2, data.train_input[:, 1] / 2)
    mask = data.train_input[0, 2, 0].bool()
    k_out, k_meas = torch.fft.fft2(image), torch.fft.fft2(measured)
    assert (k_out[..., ~mask] - k_meas[..., ~mask]).abs().max() > 1e-2  # it filled in the missing lines …
    torch.testing.assert_close(k_out[..., mask], k_meas[..., mask], rtol=1e-4, atol=1e-4)  # … and kept the rest
    torch.testing.assert_close(shown[:, 0], 2 * image.abs() - 1, rtol=1e-4, atol=1e-4)  # magnitude is shown


def test_reconstruction_beats_zero_filling(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    task = build_task(CONFIG)
    before = task.evaluate(data)
    assert before["psnr"] == pytest.approx(before["psnr-input"], abs=1e-3)  # starts as zero-filling
    task.train(data, steps=60, seed=0)
    after = task.evaluate(data)
    assert after["psnr"] > after["psnr-input"] + 3.0
    assert after["ssim"] > after["ssim-input"] and after["nmse"] < 0.5 * after["nmse-input"]
    assert "mae-hu" not in after  # MR has no Hounsfield units


def test_recon_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs task.modality = 'MR'"):
        task_config(name="recon")
    with pytest.raises(ConfigError, match="task.acceleration = 6"):
        task_config(name="recon", modality="MR", acceleration=6)


def test_preview_and_clinical_size() -> None:
    task = build_task(CONFIG)
    grid = task.preview(2)
    assert grid.shape == (6, 1, 32, 32) and grid.min() >= -1 and grid.max() <= 1
    assert not torch.allclose(grid[0], grid[2])  # zero-filled differs from fully sampled
    assert task.restore(torch.zeros(1, 3, 512, 512)).shape == (1, 1, 512, 512)


@pytest.mark.slow
def test_recon_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="recon", modality="MR", acceleration=10,
                              image_size=32)
    assert all({"psnr", "ssim", "nmse", "psnr-input", "nmse-input"} <= set(m) for m in site_metrics(records))
