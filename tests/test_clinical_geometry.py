"""Clinical resolution: physical pixel sizes, the whole HU range, whole slices by tiles, the
image-domain CT simulator against projection physics, and slices kept on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from scipy.ndimage import binary_erosion

from medgan_core.data import ct_noise, read_manifest
from medgan_core.data.dataset import DegradedPairs, load_site_data
from medgan_core.data.labels import LIVER, SOFT
from medgan_core.data.manifest import Manifest
from medgan_core.data.preprocess import CT_FULL_RANGE, to_hu, volume_to_slices
from medgan_core.data.simulate import (
    DEFAULT_SITES,
    coarse_grid,
    ct_acquire_scanners,
    ct_project_scanners,
    mr_acquire,
    phantom_labels,
    simulate_site,
    tissue_hu,
    tissue_texture,
)
from medgan_core.data.slice_store import random_crops
from medgan_core.errors import ConfigError
from medgan_core.metrics.image_quality import ct_scores
from medgan_core.models.tiling import tiled
from medgan_core.tasks.registry import task_config

DENOISE = task_config(name="denoise", image_size=32, width=8, batch_size=8)


def _noise_std(images: list[np.ndarray], clean: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean([(image - clean)[mask].std() for image in images]))


def _high_share(noise: np.ndarray) -> float:
    """Share of the noise power above half the Nyquist frequency (its texture)."""
    power = np.abs(np.fft.rfft2(noise)) ** 2
    return float(power[ct_noise.radial_frequency(noise.shape) > 0.5].sum() / power.sum())


@pytest.mark.parametrize("kernel", sorted(ct_noise.KERNEL_GAIN))
def test_image_domain_ct_noise_matches_projection_physics(kernel: str) -> None:
    """Per FBP kernel, the fast model's noise level and texture agree with a Radon transform,
    Poisson counts and scikit-image's FBP at the reference geometry (128 px over 400 mm)."""
    from medgan_core.data.simulate import CTScanner

    rng = np.random.default_rng(3)
    labels = phantom_labels(rng, 128, 1, 1.0, 0.0)[0]
    hu = tissue_hu(labels[None])[0]
    soft = binary_erosion(np.isin(labels, [SOFT, LIVER]), iterations=2)
    scanner, clean_scanner = CTScanner(1e5, kernel), CTScanner(1e12, kernel)
    pixel = 400.0 / 128
    reference_clean = ct_project_scanners(hu, [clean_scanner], pixel, rng)[0]
    reference = [ct_project_scanners(hu, [scanner], pixel, rng)[0] for _ in range(3)]
    model_clean = ct_acquire_scanners(hu, [clean_scanner], pixel, rng)[0]
    model = [ct_acquire_scanners(hu, [scanner], pixel, rng)[0] for _ in range(3)]
    ref_std, model_std = _noise_std(reference, reference_clean, soft), _noise_std(model, model_clean, soft)
    assert model_std == pytest.approx(ref_std, rel=0.15)
    inside = labels > 0
    ref_share = np.mean([_high_share(np.where(inside, r - reference_clean, 0)) for r in reference])
    model_share = np.mean([_high_share(np.where(inside, m - model_clean, 0)) for m in model])
    assert model_share == pytest.approx(ref_share, abs=0.08)


def test_quarter_dose_noise_contains_the_full_dose_noise_and_is_twice_as_large() -> None:
    rng = np.random.default_rng(5)
    labels = phantom_labels(rng, 256, 1, 1.0, 0.0)[0]
    hu = tissue_hu(labels[None])[0]
    profile = DEFAULT_SITES[0]
    full, low, _ = ct_acquire_scanners(hu, profile.scanners((1.0, 0.25)), 400 / 256, rng)
    clean = ct_acquire_scanners(hu, [type(profile.scanners()[0])(1e12, profile.ct_kernel)], 400 / 256, rng)[0]
    soft = binary_erosion(np.isin(labels, [SOFT, LIVER]), iterations=3)
    n_full, n_low = (full - clean)[soft], (low - clean)[soft]
    assert n_low.std() / n_full.std() == pytest.approx(2.0, rel=0.1)  # variance ∝ 1 / dose
    assert np.corrcoef(n_full, n_low)[0, 1] == pytest.approx(0.5, abs=0.1)  # the same projections, more noise


def test_simulated_site_at_clinical_geometry_writes_only_the_series_asked_for(tmp_path: Path) -> None:
    site = simulate_site(DEFAULT_SITES[1], tmp_path / "s", n_subjects=3, n_slices=1, size=512, seed=0,
                         series=("ct", "ct-low-dose", "mr"))
    manifest = read_manifest(site)
    assert {e.domain.split("hospital-b-")[1] for e in manifest.entries} == {"ct", "ct-low-dose", "mr"}
    ct = next(e for e in manifest.entries if e.domain.endswith("-ct"))
    first = pydicom.dcmread(next((site / ct.file).iterdir()))
    assert (first.Rows, first.Columns) == (512, 512)
    assert [float(v) for v in first.PixelSpacing] == [0.78125, 0.78125]  # 400 mm over 512 pixels
    mr = manifest.load(next(e for e in manifest.entries if e.modality == "MR"))
    assert mr.data.shape[:2] == (384, 384) and mr.spacing[:2] == pytest.approx((400 / 384, 400 / 384))  # ~1 mm
    ct_volume = manifest.load(ct)
    centre = lambda v: v.affine[:3, :3] @ ((np.array(v.data.shape) - 1) / 2) + v.affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(mr)[:2], centre(ct_volume)[:2], atol=1e-3)  # one field of view
    assert not (site / "seg").exists() and not (site / "ct-scanner-b").exists()


def test_mr_matrix_is_chosen_and_a_whole_factor_keeps_the_block_means(tmp_path: Path) -> None:
    """``mr_matrix`` 256 at a 512 CT matrix writes what format-2 studies held (the fine
    magnitude's 2×2 block means); 384 keeps the central k-space of the complex image, so the
    anatomy sits where it does at 256 and only the pixels are finer."""
    profile = DEFAULT_SITES[0]
    rng = np.random.default_rng(4)
    labels = phantom_labels(rng, 512, 1, profile.body_scale, severity=0.0)
    texture = tissue_texture(rng, labels.shape)
    fine = mr_acquire(labels, texture, profile, np.random.default_rng(9))
    blocks = mr_acquire(labels, texture, profile, np.random.default_rng(9), matrix=256)
    np.testing.assert_array_equal(blocks, coarse_grid(fine, 2))
    finer = mr_acquire(labels, texture, profile, np.random.default_rng(9), matrix=384)
    assert finer.shape == (1, 384, 384) and finer.min() >= 0  # a magnitude image
    # the same anatomy: 384 block-averaged by 3 and 256 by 2 share a 128 grid over one field
    np.testing.assert_allclose(coarse_grid(finer, 3).mean(), coarse_grid(blocks, 2).mean(), rtol=0.02)
    assert np.corrcoef(coarse_grid(finer, 3).ravel(), coarse_grid(blocks, 2).ravel())[0, 1] > 0.97
    site = simulate_site(profile, tmp_path / "s", n_subjects=3, n_slices=1, size=128, seed=0, series=("mr",))
    assert read_manifest(site).load(read_manifest(site).entries[0]).data.shape[:2] == (128, 128)  # capped at the CT's
    for bad in (30, 386):
        with pytest.raises(ConfigError, match="multiple of 4"):
            simulate_site(profile, tmp_path / f"b{bad}", n_subjects=3, n_slices=1, size=64, seed=0, series=("mr",),
                          mr_matrix=bad)


def test_a_subset_of_series_holds_the_same_ct_images(tmp_path: Path) -> None:
    every = simulate_site(DEFAULT_SITES[0], tmp_path / "all", n_subjects=3, n_slices=2, size=64, seed=9)
    subset = simulate_site(DEFAULT_SITES[0], tmp_path / "ct", n_subjects=3, n_slices=2, size=64, seed=9,
                           series=("ct",))
    a, b = read_manifest(every), read_manifest(subset)
    for entry in b.entries:
        np.testing.assert_array_equal(b.load(entry).data, a.load(entry).data)


def test_clinical_pairs_keep_the_whole_hu_range_and_the_pixel_size(tiny_sites: list[Path]) -> None:
    data = load_site_data(tiny_sites[0], DENOISE, DegradedPairs("low-dose", clinical=True))
    assert data.train.shape[-2:] == (128, 128)  # the series' own 3.125 mm pixels, not image-size
    hu = to_hu(data.train.numpy(), *CT_FULL_RANGE)
    assert hu.min() == pytest.approx(-1000, abs=30) and hu.max() > 800  # air and cortical bone, not a window
    coarse = load_site_data(tiny_sites[0], task_config(name="denoise", image_size=32, spacing=6.25),
                            DegradedPairs("low-dose", clinical=True))
    assert coarse.train.shape[-2:] == (64, 64) and coarse.num_train == data.num_train


def test_clinical_slices_are_cached_on_disk_and_rebuilt_when_a_source_changes(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, cache = DegradedPairs("low-dose", clinical=True), tmp_path / "cache"
    first = load_site_data(tiny_sites[0], DENOISE, spec, cache)
    files = sorted(p.name for p in cache.glob("*.npy") if not p.name.endswith("-series.npy"))
    assert len(files) == 4  # train and test, input and target
    counts = sorted(int(np.load(p).sum()) for p in cache.glob("*-series.npy"))  # each split's slices by subject
    assert counts == sorted([len(first.train), len(first.test)])
    assert first.train_series is not None and int(first.train_series.sum()) == len(first.train)
    stored = np.load(cache / files[0], mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.shape[1:] == (1, 128, 128)
    assert cache.stat().st_mode & 0o777 == 0o700  # images derived from patients: the site's user only
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache.glob("*.npy"))

    loads: list[str] = []
    original = Manifest.load
    monkeypatch.setattr(Manifest, "load", lambda self, entry: loads.append(entry.file) or original(self, entry))
    again = load_site_data(tiny_sites[0], DENOISE, spec, cache)
    assert loads == []  # nothing decoded again
    torch.testing.assert_close(again.train, first.train)
    torch.testing.assert_close(again.test_input, first.test_input)
    assert again.train_series is not None and torch.equal(again.train_series, first.train_series)

    manifest = read_manifest(tiny_sites[0])
    touched = next((tiny_sites[0] / manifest.select(modality="CT", split="test")[0].file).iterdir())
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        load_site_data(tiny_sites[0], DENOISE, spec, cache)
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert loads and len(list(cache.glob("*.npy"))) == 9  # the test split rebuilt under a new key (3 files)
    assert not list(cache.glob(".building-*"))  # no half-written file left behind


def test_random_patches_are_aligned_and_small_slices_are_padded_with_air() -> None:
    images = torch.randn(5, 1, 40, 50)
    idx = torch.tensor([4, 0, 4])
    low, full = random_crops([images, 2 * images], idx, 16, torch.Generator().manual_seed(0))
    assert low.shape == (3, 1, 16, 16) and torch.equal(full, 2 * low)
    assert any(torch.equal(low[0], images[4, :, t:t + 16, l:l + 16]) for t in range(25) for l in range(35))
    small, = random_crops([torch.zeros(2, 1, 10, 12)], torch.tensor([1]), 16, torch.Generator().manual_seed(0))
    assert small.shape == (1, 1, 16, 16) and (small == -1).sum() == 16 * 16 - 10 * 12
    body = -torch.ones(4, 1, 64, 64)
    body[:, :, 24:64, 24:64] = 0.5  # the patient fills a corner of the slice
    centres = [crop[0, 0, 8, 8].item() for _ in range(40)
               for crop in random_crops([body], torch.tensor([0]), 16, torch.Generator().manual_seed(_), centre_above=0.0)]
    assert np.mean(np.array(centres) > 0) > 0.95  # drawn on the patient, not the air around it
    uniform = [crop[0, 0, 8, 8].item() for _ in range(40)
               for crop in random_crops([body], torch.tensor([0]), 16, torch.Generator().manual_seed(_))]
    assert np.mean(np.array(uniform) > 0) < 0.7  # about 45 % by chance
    mixed = [crop[0, 0, 8, 8].item() for _ in range(40)
             for crop in random_crops([body], torch.tensor([0]), 16, torch.Generator().manual_seed(_), centre_above=0.0,
                                      anywhere=1.0)]
    assert np.mean(np.array(mixed) > 0) < 0.7  # anywhere = 1: every place drawn uniformly again


def test_whole_slices_go_through_the_network_as_blended_tiles_of_the_patch_size() -> None:
    seen: list[tuple[int, ...]] = []
    pointwise = torch.nn.Conv2d(1, 1, 1)

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return pointwise(x)

    image = torch.randn(2, 1, 100, 75)
    with torch.no_grad():
        out = tiled(net, image, 32, batch=16)
        torch.testing.assert_close(out, pointwise(image), atol=1e-5, rtol=1e-5)
    assert out.shape == image.shape and set(seen) == {(32, 32)}
    seen.clear()
    with torch.no_grad():
        tiled(net, torch.randn(3, 1, 32, 32), 32, batch=2)
    assert seen == [(32, 32), (32, 32)]  # a patch-sized image is not tiled: batches of 2, then 1


def test_ct_scores_read_hu_inside_the_body_and_the_window() -> None:
    yy, xx = np.mgrid[:64, :64]
    body = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    target_hu = np.where(body, 40.0, -1000.0)
    target_hu[30:34, 30:34] = 1000.0  # bone
    unit = lambda hu: torch.from_numpy(((hu - CT_FULL_RANGE[0]) / (CT_FULL_RANGE[1] - CT_FULL_RANGE[0]) * 2 - 1)  # noqa: E731
                                       .astype(np.float32))[None, None]
    outside_wrong = np.where(body, target_hu, -500.0)
    scores = ct_scores(unit(outside_wrong), unit(target_hu), CT_FULL_RANGE, (-160.0, 240.0))
    assert scores["mae-hu"][0] == pytest.approx(0.0, abs=0.5)  # only inside the body counts
    assert scores["psnr"][0] < 40  # the whole-range PSNR sees the error outside
    bone_wrong = target_hu.copy()
    bone_wrong[30:34, 30:34] = 1500.0
    scores = ct_scores(unit(bone_wrong), unit(target_hu), CT_FULL_RANGE, (-160.0, 240.0))
    assert scores["psnr-window"][0] > 60  # bone beyond the soft-tissue window looks the same there …
    assert scores["mae-hu"][0] == pytest.approx(500 * 16 / body.sum(), rel=0.01)  # … but MAE counts it


def test_spacing_is_checked_and_whole_slice_tasks_take_the_centre_at_that_spacing(tiny_sites: list[Path]) -> None:
    with pytest.raises(ConfigError, match="task.spacing = 0.01"):
        task_config(spacing=0.01)
    manifest = read_manifest(tiny_sites[0])
    volume = manifest.load(manifest.select(modality="CT", split="train")[0])
    window = (-160.0, 240.0)
    whole = volume_to_slices(volume, 32, window)
    centre = volume_to_slices(volume, 32, window, spacing=6.25)  # 64 px at 6.25 mm; its central 32 = 200 mm
    assert whole.shape == centre.shape == (volume.data.shape[2], 1, 32, 32)
    resampled = volume_to_slices(volume, 64, window, spacing=6.25)  # all 400 mm of it
    torch.testing.assert_close(centre, resampled[..., 16:48, 16:48])
    padded = volume_to_slices(volume, 128, window, spacing=6.25)  # 800 mm asked of a 400 mm scan: air around it
    torch.testing.assert_close(padded[..., 32:96, 32:96], resampled)
    assert (padded[..., :32, :] == -1).all()


def test_the_ssim_loss_of_whole_range_ct_is_taken_in_the_window() -> None:
    from medgan_core.metrics.image_quality import ssim_per_image
    from medgan_core.tasks.registry import build_task

    task = build_task(DENOISE)
    hu = torch.full((1, 1, 16, 16), 40.0)
    hu[..., 4:8, 4:8] = 1500.0  # bone: beyond the window, the same as 240 HU there
    unit = lambda h: (h - CT_FULL_RANGE[0]) / (CT_FULL_RANGE[1] - CT_FULL_RANGE[0]) * 2 - 1  # noqa: E731
    shown = task.in_window(unit(hu))
    assert shown.min() == pytest.approx(0.0, abs=1e-4) and shown.max() == 1.0  # 40 HU: mid-window; bone clipped
    brighter = hu.clone()
    brighter[..., 4:8, 4:8] = 2500.0
    assert ssim_per_image(task.in_window(unit(brighter)), shown).item() == pytest.approx(1.0)
    assert ssim_per_image(unit(brighter), unit(hu)).item() < 1.0  # the whole range would count the bone
