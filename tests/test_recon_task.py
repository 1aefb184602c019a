"""Compressed-sensing MR reconstruction: undersampled k-space on disk, data consistency, a GAN
that beats the zero-filled inverse FFT."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgan_core.data import read_manifest
from medgan_core.data.kspace import (
    acquired_columns,
    crop_kspace,
    matrix_at,
    read_kspace,
)
from medgan_core.errors import ConfigError, DataError
from medgan_core.data.compressed_sensing import tv_reconstruction
from medgan_core.metrics.image_quality import psnr_ssim
from medgan_core.models.unet import DataConsistentUNet, data_consistency, magnitude
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, task_config

# The sites' MR is 128×128 at 3.125 mm: at 6.25 mm the task reconstructs 64×64 slices from the
# central k-space and trains on strips of 32 whole rows.
CONFIG = task_config(name="recon", modality="MR", image_size=32, spacing=6.25, width=8, batch_size=8, local_steps=3,
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


def test_centred_fourier_resampling_samples_the_coarse_pixels_centres() -> None:
    """512 -> 384 (the simulator's MR): a band-limited image comes out exactly at the centres
    of the coarser pixels over the same field, not at the fine grid's first pixel."""
    wave = lambda t: np.cos(2 * np.pi * 3 * t / 512) + 0.5 * np.sin(2 * np.pi * 7 * t / 512)  # noqa: E731
    fine = wave(np.arange(512.0))[:, None] * wave(np.arange(512.0))[None, :] + 1.0
    coarse = crop_kspace(fine[None], 384, centred=True)
    centres = (512 / 384 - 1) / 2 + np.arange(384) * 512 / 384  # in fine pixels
    expected = wave(centres)[:, None] * wave(centres)[None, :] + 1.0
    np.testing.assert_allclose(coarse[0].real, expected, atol=1e-9)
    assert np.abs(coarse.imag).max() < 1e-9 and coarse.real.mean() == pytest.approx(fine.mean())
    # a whole factor lands on the block centres too (what coarse_grid's block means sit at)
    halves = crop_kspace(fine[None], 256, centred=True)[0].real
    np.testing.assert_allclose(halves, (wave(0.5 + 2 * np.arange(256.0))[:, None]
                                        * wave(0.5 + 2 * np.arange(256.0))[None, :] + 1.0), atol=1e-9)
    with pytest.raises(DataError, match="larger than"):
        crop_kspace(fine[None], 600, centred=True)


def test_data_consistency_keeps_every_measured_line(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.train_input is not None and data.train_input.shape[1:] == (3, 64, 64)
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


def test_data_consistency_on_a_strip_of_rows_is_the_whole_slices(tiny_sites: list[Path]) -> None:
    """Training reads strips of whole rows: each row's projection must not depend on the
    others, so the network on a strip agrees with the 2D projection on the whole slice."""
    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.train_input is not None
    inputs = data.train_input[:3]
    estimate = torch.randn(3, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    strip = data_consistency(estimate[..., 16:48, :], inputs[..., 16:48, :])
    mask = inputs[:, 2]
    as_2d = torch.fft.ifft2(mask * torch.fft.fft2(torch.complex((inputs[:, 0] + 1) / 2, inputs[:, 1] / 2))
                            + (1 - mask) * torch.fft.fft2(torch.complex((estimate[:, 0] + 1) / 2, estimate[:, 1] / 2)))
    torch.testing.assert_close(strip, as_2d[..., 16:48, :], rtol=1e-4, atol=1e-5)
    task = build_task(CONFIG)
    low, full = task.training_pair(data, torch.tensor([0, 2, 5]), torch.Generator().manual_seed(1))
    assert low.shape == (3, 3, 32, 64) and full.shape == (3, 1, 32, 64)  # image-size rows, every column
    rows = [next(t for t in range(33) if torch.equal(full[j], data.train[i, :, t : t + 32]))
            for j, i in enumerate((0, 2, 5))]
    assert all(torch.equal(low[j], data.train_input[i, :, t : t + 32]) for j, (i, t) in enumerate(zip((0, 2, 5), rows)))


def test_the_matrix_follows_the_spacing_and_never_invents_detail(tiny_sites: list[Path]) -> None:
    assert matrix_at((256, 256), (1.5625, 1.5625), 0.0) == (256, 256)
    assert matrix_at((270, 250), (1.0, 1.0), 0.0) == (268, 248)  # the U-Net halves it twice
    assert matrix_at((256, 256), (1.5625, 1.5625), 3.125) == (128, 128)
    with pytest.raises(DataError, match="finer than the acquisition"):
        matrix_at((256, 256), (1.5625, 1.5625), 1.0)
    native = load_task_data(tiny_sites[0], task_config(name="recon", modality="MR", image_size=32, acceleration=4))
    assert native.train.shape[-2:] == (128, 128)  # spacing 0: the acquired matrix
    with pytest.raises(DataError, match="finer than the acquisition"):
        load_task_data(tiny_sites[0], task_config(name="recon", modality="MR", image_size=32, spacing=1.0,
                                                  acceleration=4))


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
    with pytest.raises(ConfigError, match="task.cascades = 0"):
        task_config(name="recon", modality="MR", cascades=0)


def test_a_cascade_starts_as_zero_filling_and_keeps_the_measured_lines(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.train_input is not None
    inputs = data.train_input[:2]
    net = DataConsistentUNet(8, cascades=3)
    assert len(net.more) == 2 and "more.1.out.weight" in net.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(net(inputs), build_task(CONFIG).input_image(inputs), rtol=1e-4, atol=1e-4)
        for stage in (net.unet, *net.more):
            torch.nn.init.normal_(stage.out.weight, std=0.5)
        single = DataConsistentUNet(8)
        single.unet.load_state_dict(net.unet.state_dict())
        image = net.complex_image(inputs)
        assert (image - single.complex_image(inputs)).abs().max() > 1e-3  # the later stages change the image …
    mask = inputs[0, 2, 0].bool()
    measured = torch.fft.fft2(torch.complex((inputs[:, 0] + 1) / 2, inputs[:, 1] / 2))
    torch.testing.assert_close(torch.fft.fft2(image)[..., mask], measured[..., mask], rtol=1e-4, atol=1e-4)  # … not the data


def test_tv_start_begins_at_the_tv_reconstruction_and_training_improves_on_it(tiny_sites: list[Path],
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    config = task_config(name="recon", modality="MR", image_size=32, spacing=6.25, width=8, batch_size=8,
                         local_steps=3, lr_generator=1e-3, lr_discriminator=1e-3, acceleration=4, tv_start=0.01)
    with caplog.at_level(logging.INFO, logger="medgan_core.data.dataset"):
        data = load_task_data(tiny_sites[1], config)
    assert "train split, TV start of subject 1 of" in caplog.text  # the slow part of loading reports progress
    assert data.train_input is not None and data.test_input is not None
    assert data.train_input.shape[1] == 4 and data.test_input.shape[1] == 4  # the TV image rides along
    plain = load_task_data(tiny_sites[1], CONFIG)
    assert plain.test_input is not None
    torch.testing.assert_close(data.test_input[:, :3], plain.test_input)
    torch.testing.assert_close(data.test_input[:, 3:], torch.from_numpy(tv_reconstruction(plain.test_input.numpy(), 0.01)))
    tv_psnr, _ = psnr_ssim(data.test_input[:, 3:], data.test)
    task = build_task(config)
    before = task.evaluate(data)
    assert tv_psnr > before["psnr-input"] + 3.0  # the solver works: TV-CS beats zero-filling …
    assert before["psnr"] > tv_psnr - 0.5  # … and the untrained model is TV-CS with the measured lines put back
    with torch.no_grad():
        start = DataConsistentUNet(8, tv_start=True)(data.test_input[:2])
        manual = magnitude(data_consistency(torch.cat([data.test_input[:2, 3:], torch.zeros_like(data.test_input[:2, 3:])], 1),
                                            data.test_input[:2]))
    torch.testing.assert_close(start, manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without it"):  # inputs prepared without the TV image: one clear error
        DataConsistentUNet(8, tv_start=True)(plain.test_input[:2])
    task.train(data, steps=60, seed=0)
    assert task.evaluate(data)["psnr"] > before["psnr"] + 0.3  # training learns what TV misses


def test_tv_start_is_checked_and_reaches_a_new_scan() -> None:
    with pytest.raises(ConfigError, match="task.tv-start = -0.1"):
        task_config(name="recon", modality="MR", tv_start=-0.1)
    with pytest.raises(ConfigError, match="task.tv-start = 2"):
        task_config(name="recon", modality="MR", tv_start=2.0)
    config = task_config(name="recon", modality="MR", image_size=32, spacing=6.25, width=8, tv_start=0.01)
    task = build_task(config)
    assert task.model_channels == 4 and task.preview(2).shape == (6, 1, 64, 64)  # previews carry the TV image too


def test_tv_start_trains_under_dp_as_per_record_preprocessing(tiny_sites: list[Path], tmp_path: Path) -> None:
    from medgan_core.config import PrivacyConfig, SiteConfig
    from medgan_core.site_round import train_site_round

    config = task_config(name="recon", modality="MR", image_size=32, spacing=6.25, width=8, batch_size=8,
                         local_steps=2, acceleration=4, tv_start=0.01)
    task = build_task(config)
    before = task.get_weights()
    metrics = train_site_round(task, load_task_data(tiny_sites[1], config), SiteConfig(str(tiny_sites[1]),
                               state_dir=str(tmp_path)), PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0,
                                                                       secure_rng=False),
                               planned_rounds=1, study_id="tv", seed=0)
    assert metrics["dp"] == 1.0 and 0 < metrics["epsilon"] <= 100.0 and metrics["dp-steps"] == 2
    after = task.get_weights()
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # DP-SGD steps were taken


def test_preview_and_clinical_size() -> None:
    task = build_task(CONFIG)
    grid = task.preview(2)
    assert grid.shape == (6, 1, 64, 64) and grid.min() >= -1 and grid.max() <= 1  # 256² MR at 6.25 mm
    assert not torch.allclose(grid[0], grid[2])  # zero-filled differs from fully sampled
    assert task.restore(torch.zeros(1, 3, 512, 512)).shape == (1, 1, 512, 512)


@pytest.mark.slow
def test_recon_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="recon", modality="MR", acceleration=10,
                              image_size=32)
    assert all({"psnr", "ssim", "nmse", "psnr-input", "nmse-input"} <= set(m) for m in site_metrics(records))
