"""The phantom study: real files, physically plausible values, sites that differ."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medgan_core.tasks.registry import task_config
from medgan_core.data import read_manifest
from medgan_core.data.simulate import phantom_scanner_series, simulate_study, site_profile
from medgan_core.errors import ConfigError


def _ct_slices(site: Path) -> np.ndarray:
    manifest = read_manifest(site)
    return np.concatenate([manifest.load(e).axial_slices() for e in manifest.select(modality="CT")])


def _mr_slices(site: Path) -> np.ndarray:
    manifest = read_manifest(site)
    return np.concatenate([manifest.load(e).axial_slices() for e in manifest.select(modality="MR")])


def _soft_tissue(slices: np.ndarray) -> np.ndarray:
    return (slices > -200) & (slices < 200)


def _noise_hu(slices: np.ndarray) -> float:
    """Robust std (MAD) of the high-pass residual in soft tissue: quantum noise, not edges."""
    residual = (slices - gaussian_filter(slices, sigma=(0, 1, 1)))[_soft_tissue(slices)]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def test_study_writes_dicom_nifti_and_manifests(tiny_sites: list[Path]) -> None:
    for site in tiny_sites:
        manifest = read_manifest(site)
        ct = manifest.select(modality="CT")
        mr = manifest.select(modality="MR")
        assert len(ct) == len(mr) >= 4
        assert {e.split for e in manifest.entries} == {"train", "val", "test"}
        assert all((site / e.file).is_dir() for e in ct)  # DICOM series folders
        assert all(e.file.endswith(".nii.gz") for e in mr)
        assert {e.pair_id for e in ct} == {e.pair_id for e in mr}  # paired CT/MR per subject
        assert {e.label for e in manifest.entries} <= {"lesion", "normal"}


def test_ct_is_in_hounsfield_units(tiny_sites: list[Path]) -> None:
    for site in tiny_sites:
        ct = _ct_slices(site)
        corner = ct[:, :3, :3]
        assert np.all(corner <= -990)  # air outside the body
        body = ct[(ct > -300) & (ct < 300)]
        assert -30 < np.median(body) < 90  # soft tissue, fat and liver around 40 HU
        assert ct.max() > 500  # bone


def test_sites_differ_like_hospitals(tiny_sites: list[Path]) -> None:
    site_a, site_c = tiny_sites  # reference dose vs low dose, different MR gain and protocol
    ct_a, ct_c = _ct_slices(site_a), _ct_slices(site_c)
    assert _noise_hu(ct_c) > 1.5 * _noise_hu(ct_a)  # lower dose, noisier image
    assert np.median(ct_c[_soft_tissue(ct_c)]) < np.median(ct_a[_soft_tissue(ct_a)]) - 8  # calibration offset
    mr_a, mr_c = _mr_slices(site_a), _mr_slices(site_c)
    assert np.percentile(mr_c, 99) > 1.2 * np.percentile(mr_a, 99)


def test_simulation_is_seeded(tmp_path: Path) -> None:
    kwargs = {"n_sites": 1, "n_subjects": 3, "n_slices": 2, "size": 32}
    first = simulate_study(tmp_path / "a", seed=5, **kwargs)[0]
    again = simulate_study(tmp_path / "b", seed=5, **kwargs)[0]
    other = simulate_study(tmp_path / "c", seed=6, **kwargs)[0]
    np.testing.assert_array_equal(_ct_slices(first), _ct_slices(again))
    assert not np.array_equal(_ct_slices(first), _ct_slices(other))


def test_more_sites_than_reference_profiles_still_differ(tmp_path: Path) -> None:
    from medgan_core.data.simulate import site_profiles

    profiles = site_profiles(6, seed=0)
    assert len({p.name for p in profiles}) == 6
    assert len({round(p.ct_photons) for p in profiles}) == 6


def test_label_maps_and_second_scanner_align_with_the_ct(tiny_sites: list[Path]) -> None:
    from medgan_core.data.simulate import AIR, LIVER, TISSUES

    manifest = read_manifest(tiny_sites[0])
    segs = {e.pair_id: e for e in manifest.select(modality="SEG")}
    second = {e.pair_id: e for e in manifest.select(modality="CT", variant="scanner-b")}
    ct = {e.pair_id: e for e in manifest.select(modality="CT")}
    assert segs.keys() == ct.keys() == second.keys()
    assert all(e.domain.endswith("-seg") and e.file.endswith(".nii.gz") for e in segs.values())
    for key, entry in ct.items():
        labels = manifest.load(segs[key]).axial_slices()
        hu = manifest.load(entry).axial_slices()
        assert labels.shape == hu.shape and set(np.unique(labels)) <= set(TISSUES)
        assert np.median(hu[labels == AIR]) < -950
        if (labels == LIVER).any():
            assert 30 < np.median(hu[labels == LIVER]) < 90  # liver is 60 HU at hospital A
        b = manifest.load(second[key]).axial_slices()
        assert b.shape == hu.shape and not np.array_equal(b, hu)


def test_a_rescan_differs_from_the_scan_only_by_quantum_noise(tiny_sites: list[Path]) -> None:
    """The cycle benchmark's perfect-harmoniser reference: the same scanner twice gives the
    same anatomy and calibration with independent noise; scanner B reads brighter."""
    profile = site_profile(tiny_sites[0])
    assert profile.name == "hospital-a"
    main, second = profile.scanners()
    config = task_config(name="cycle", image_size=32)
    scan, rescan, scan_b = phantom_scanner_series(3, config, profile, [main, main, second], seed=4)
    assert scan.shape == rescan.shape == scan_b.shape == (3, 1, 32, 32)
    body = scan > -0.99
    assert not torch.equal(scan, rescan)  # independent noise
    assert abs(float((rescan - scan)[body].mean())) * 200 < 1.0  # same calibration (HU per unit: 200)
    assert float((scan_b - scan)[body].mean()) * 200 > 20  # scanner B reads 45 HU high at hospital A
    again = phantom_scanner_series(3, config, profile, [main, main, second], seed=4)
    assert all(torch.equal(x, y) for x, y in zip(again, (scan, rescan, scan_b)))  # seeded
    with pytest.raises(ConfigError, match="site.json"):
        site_profile(tiny_sites[0] / "ct")


def test_the_clinical_rescan_is_at_the_task_spacing_over_the_whole_ct_range(tiny_sites: list[Path]) -> None:
    """What the cycle benchmark's re-scan reference and the cycle previews read: 512×512 over
    400 mm resampled to ``task.spacing``, bone above the soft-tissue window kept."""
    profile = site_profile(tiny_sites[0])
    main, second = profile.scanners()
    config = task_config(name="cycle", image_size=32, spacing=3.125)
    scan, rescan, scan_b = phantom_scanner_series(1, config, profile, [main, main, second], seed=4, clinical=True)
    assert scan.shape == rescan.shape == scan_b.shape == (1, 1, 128, 128)
    hu = (scan + 1) / 2 * 4095 - 1024
    assert float(hu.max()) > 600 and float(hu.min()) < -900  # bone and air: not clipped to a window
    body = (hu > -100) & (hu < 200)
    assert float((scan_b - scan)[body].mean()) * 2047.5 > 20  # scanner B reads 45 HU high at hospital A


def test_a_study_simulated_in_the_old_format_is_named_stale(tmp_path: Path) -> None:
    import json

    from medgan_core.data.simulate import SIMULATOR_FORMAT, stale_simulation

    (tmp_path / "study.json").write_text(json.dumps({"sites": [], "seed": 0}))
    assert "simulated by an older version (format 1" in stale_simulation(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"sites": [], "format": SIMULATOR_FORMAT}))
    assert stale_simulation(tmp_path) == ""


def test_ellipses_tested_in_their_square_match_the_whole_grid_test() -> None:
    """The simulator tests organ pixels only near each organ: the same pixels as the formula
    on the whole grid, also for ellipses at or past the field's edge."""
    import numpy as np

    from medgan_core.data.simulate import _ellipse

    lin = np.linspace(-1, 1, 97)
    x, y = np.meshgrid(lin, lin)
    rng = np.random.default_rng(0)
    for _ in range(200):
        cx, cy = rng.uniform(-1.3, 1.3, 2)
        ax, ay = rng.uniform(0.005, 0.9, 2)
        angle = rng.uniform(-np.pi, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
        assert np.array_equal(_ellipse(x, y, cx, cy, ax, ay, angle), (u / ax) ** 2 + (v / ay) ** 2 <= 1.0)


def test_tissue_texture_is_the_coarse_field_interpolated_with_half_pixel_centres() -> None:
    """The 512 texture is the 128 field upsampled as scipy's zoom (grid mode, edges held) does it."""
    import numpy as np
    from scipy.ndimage import zoom

    from medgan_core.data.simulate import _texture, tissue_texture

    fine = tissue_texture(np.random.default_rng(3), (2, 512, 512))
    coarse = _texture(np.random.default_rng(3), (2, 128, 128), sigma=1.5 * 512 / (128 * 4))
    expected = zoom(coarse, (1, 4, 4), order=1, grid_mode=True, mode="nearest")
    expected /= expected.std()
    assert fine.shape == (2, 512, 512) and fine.dtype == np.float32
    assert np.abs(fine - expected).max() < 1e-5


def test_missing_series_names_what_a_task_lacks_with_a_command_a_shell_can_run(tmp_path: Path) -> None:
    import json
    import shlex

    from medgan_core.data.simulate import missing_series

    sites = tmp_path / "my sites"
    sites.mkdir()
    (sites / "study.json").write_text(json.dumps({"sites": ["a", "b"], "series": ["ct"], "subjects": 3, "slices": 2,
                                                  "size": 64, "seed": 7}))
    assert missing_series(sites, ("ct",), "synthesis") == ""
    text = missing_series(sites, ("ct", "ct-low-dose"), "denoise")
    assert "task denoise also reads ct-low-dose" in text
    words = shlex.split(text.split("are replaced): ")[1])
    assert words[words.index("--out") + 1] == str(sites)  # quoted: the space stays in the path
    assert words[words.index("--seed") + 1] == "7" and words[words.index("--sites") + 1] == "2"
    (sites / "study.json").write_text("not json")
    assert missing_series(sites, ("ct", "ct-low-dose"), "denoise") == ""  # an unreadable record: no claim
