"""CycleGAN scanner harmonisation: unpaired data from disjoint subjects, per-sample
gradients through both generators, evaluation against the same subject on scanner A."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation_checks import site_without
from medgan_core.data.dataset import labelled_slices, unpaired_subjects
from medgan_core.data.manifest import read_manifest
from medgan_core.data.simulate import DEFAULT_SITES
from medgan_core.errors import ConfigError, DataError
from medgan_core.models.unet import CycleGenerators
from medgan_core.privacy import DPSettings, SiteAccountant, make_private
from medgan_core.privacy.ghost import ghost_per_sample, has_ghost
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, replace_task, task_config

CONFIG = task_config(name="cycle", image_size=32, width=8, batch_size=8, local_steps=3, lr_generator=2e-3,
                    lr_discriminator=2e-3)


def test_training_scanners_come_from_disjoint_subjects(tiny_sites: list[Path]) -> None:
    a, b = unpaired_subjects(["s0", "s1", "s2", "s3", "s4"])
    assert set(a).isdisjoint(b) and sorted(a + b) == ["s0", "s1", "s2", "s3", "s4"] and len(a) == 3

    data = load_task_data(tiny_sites[1], CONFIG)  # 7 subjects: 5 train -> 3 on scanner A, 2 on B; 4 slices each
    manifest = read_manifest(tiny_sites[1])
    train_subjects = sorted({e.subject for e in manifest.select(modality="CT", split="train")})
    assert len(train_subjects) == 5
    assert data.train.shape[0] == 12 and data.train_input is not None and data.train_input.shape[0] == 8
    assert data.test_input is not None and data.test_input.shape == data.test.shape  # held out: same subjects


def test_scanner_b_differs_by_its_calibration(tiny_sites: list[Path]) -> None:
    """Hospital A's second scanner reads +45 HU and 12 % gain: visible in soft tissue."""
    from medgan_core.data.preprocess import CT_FULL_RANGE

    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.test_input is not None
    low, high = CT_FULL_RANGE
    hu_per_unit = (high - low) / 2
    hu = (data.test + 1) * hu_per_unit + low
    body = (hu > -100) & (hu < 200)  # soft tissue
    shift = float((data.test_input - data.test)[body].mean()) * hu_per_unit
    expected = DEFAULT_SITES[0].scanner_b_offset_hu
    assert expected - 20 < shift < expected + 25


def test_cycle_needs_ct_and_the_second_scanner(tmp_path: Path, tiny_sites: list[Path]) -> None:
    with pytest.raises(ConfigError, match="two CT scanners"):
        task_config(name="cycle", modality="MR")
    site = site_without(tiny_sites[0], tmp_path, "scanner-b")
    with pytest.raises(DataError, match="scanner-b"):
        load_task_data(site, CONFIG)


def test_per_sample_gradients_through_both_generators_are_exact() -> None:
    """The cycle loss runs ``ba`` twice per record (cycle and identity) and ``ab`` once;
    Opacus must attribute each record's gradient to that record alone."""
    torch.manual_seed(0)
    generators = CycleGenerators(8)
    torch.nn.init.normal_(generators.ab.out.weight, 0, 0.1)
    torch.nn.init.normal_(generators.ba.out.weight, 0, 0.1)
    reference = CycleGenerators(8)
    reference.load_state_dict(generators.state_dict())
    images = torch.randn(3, 1, 16, 16)

    def record_loss(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        fake = net(x, "ab")
        return ((net(fake, "ba") - x).abs().mean(dim=(1, 2, 3)) + (net(x, "ba") - x).abs().mean(dim=(1, 2, 3))
                + fake.mean(dim=(1, 2, 3)))

    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, expected_batch_size=3)
    wrapped, _ = make_private(generators, torch.optim.SGD(generators.parameters(), lr=0.1), dp)
    record_loss(wrapped, images).mean().backward()  # batch mean, as the task's losses (Opacus undoes it)
    for i in range(3):
        reference.zero_grad()
        record_loss(reference, images[i : i + 1]).sum().backward()
        for (name, p), q in zip(wrapped.named_parameters(), reference.parameters()):
            per_sample = ghost_per_sample(p) if has_ghost(p) else p.grad_sample  # deep layers: as factors
            torch.testing.assert_close(per_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dp_training_spends_one_joint_release_per_step_and_changes_both_groups(tiny_sites: list[Path], tmp_path: Path) -> None:
    data = load_task_data(tiny_sites[0], CONFIG)
    task = build_task(CONFIG)
    before = task.get_weights()
    accountant = SiteAccountant("rdp", 1e-5, tmp_path / "acc.json")
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4, secure_rng=False)
    metrics = task.train(data, steps=3, seed=0, dp=dp, accountant=accountant)
    assert accountant.steps == 3  # G and D groups on each record's batch: one joint release per step
    assert accountant.history[0][0] == pytest.approx(1.0 / np.sqrt(2))
    after = task.get_weights()
    for group in ("generator.ab.", "generator.ba.", "discriminator.a.", "discriminator.b."):
        assert any(not np.array_equal(before[n], after[n]) for n in before if n.startswith(group)), group
    assert {"loss-d", "loss-g", "loss-cycle", "loss-identity"} <= set(metrics)


def test_harmonisation_moves_scanner_b_towards_scanner_a(tiny_sites: list[Path]) -> None:
    config = replace_task(CONFIG, **{"image_size": 16})
    data = load_task_data(tiny_sites[0], config)
    task = build_task(config)
    start = task.evaluate(data)
    assert start["psnr"] == pytest.approx(start["psnr-input"])  # the generators start as the identity
    task.train(data, steps=40, seed=0)
    after = task.evaluate(data)
    assert after["mae-hu"] < start["mae-hu"]


def test_preview_rows_are_whole_slices_at_the_task_spacing() -> None:
    task = build_task(replace_task(CONFIG, spacing=3.125))  # 400 mm at 3.125 mm: 128 pixels
    grid = task.preview(2)
    assert grid.shape == (6, 1, 128, 128)
    assert not torch.allclose(grid[0], grid[2])  # scanner B beside scanner A
    assert task.restore(torch.zeros(1, 1, 200, 136)).shape == (1, 1, 200, 136)  # any whole slice, tile by tile


@pytest.mark.parametrize("clinical", [False, True])
def test_label_maps_align_with_the_images(tiny_sites: list[Path], clinical: bool) -> None:
    from medgan_core.data.labels import AIR, CORTICAL

    config = replace_task(CONFIG, spacing=6.25) if clinical else CONFIG
    images, labels = labelled_slices(tiny_sites[0], config, "train", variant="scanner-b", clinical=clinical)
    assert images.shape[0] == labels.shape[0] and labels.shape[-2:] == images.shape[-2:]
    assert labels.shape[-2:] == ((64, 64) if clinical else (32, 32))
    assert float(images[:, 0][labels == AIR].mean()) < -0.95  # air is black on every scanner
    if clinical:  # the whole CT range: bone is bright, not clipped at the window's top
        assert float(images[:, 0][labels == CORTICAL].mean()) > -0.2  # cortical bone, over 600 HU


@pytest.mark.slow
def test_cycle_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="cycle", image_size=16)
    assert all({"psnr", "ssim", "mae-hu", "psnr-input"} <= set(m) for m in site_metrics(records))


def test_patches_lie_on_the_patient_and_train_the_calibration_and_whole_slices_are_scored(
        tiny_sites: list[Path]) -> None:
    from medgan_core.data.slice_store import random_crops

    config = replace_task(CONFIG, image_size=16)
    data = load_task_data(tiny_sites[0], config)
    task = build_task(config)
    generator = torch.Generator().manual_seed(0)
    idx = torch.arange(len(data.train))
    (centred,) = random_crops([data.train], idx, 16, generator, centre_above=task.body_level)
    (anywhere,) = random_crops([data.train], idx, 16, generator)
    assert float(centred[:, 0, 8, 8].gt(task.body_level).float().mean()) > 0.9
    assert float(anywhere[:, 0, 8, 8].gt(task.body_level).float().mean()) < 0.9
    generators = task.groups["generator"]
    assert generators.calibrate_ba.gain_offset == (1.0, 0.0)  # the identity at start
    task.train(data, steps=3, seed=0)
    assert generators.calibrate_ba.gain_offset != (1.0, 0.0) and generators.calibrate_ab.gain_offset != (1.0, 0.0)
    metrics = task.evaluate(data)  # fully convolutional: trained on 16² patches, scored on the 128² slices
    assert {"psnr", "psnr-window", "ssim", "mae-hu", "psnr-input"} <= set(metrics)
    assert np.isfinite(metrics["mae-hu"]) and task.restore(data.test_input[:1]).shape == (1, 1, 128, 128)


def test_the_discriminators_and_losses_see_the_window_view() -> None:
    """A 40 HU calibration error is 0.02 of the whole range but 0.2 of the window: the
    second view carries it at the size a reader sees."""
    task = build_task(CONFIG)
    soft = torch.full((1, 1, 4, 4), (40.0 + 1024) / 2047.5 - 1)  # 40 HU
    shifted = torch.full((1, 1, 4, 4), (80.0 + 1024) / 2047.5 - 1)  # 80 HU
    views = task.views(soft)
    assert views.shape == (1, 2, 4, 4)
    difference = (task.views(shifted) - views).abs().mean(dim=(0, 2, 3))
    assert float(difference[0]) == pytest.approx(40 / 2047.5, rel=1e-3)
    assert float(difference[1]) == pytest.approx(40 / 200, rel=1e-3)  # window [-160, 240]: 400 HU over 2 units


def test_a_training_step_gives_every_loss_and_both_discriminators_the_two_views(
    tiny_sites: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cycle, identity and TV losses and the discriminators read (whole range, window)
    pairs whose second channel is the first put into the window, not the image alone."""
    import medgan_core.tasks.cycle as cycle

    task = build_task(replace_task(CONFIG, tv_weight=1.0))
    seen: list[tuple[str, torch.Tensor]] = []

    def spy(name, fn):  # type: ignore[no-untyped-def]
        def wrapped(*tensors):  # type: ignore[no-untyped-def]
            seen.extend((name, t.detach()) for t in tensors)
            return fn(*tensors)
        return wrapped

    monkeypatch.setattr(cycle, "l1_per_view", spy("l1", cycle.l1_per_view))
    monkeypatch.setattr(cycle, "total_variation", spy("tv", cycle.total_variation))
    judge = task.discriminator.forward
    monkeypatch.setattr(task.discriminator, "forward", lambda x, d: seen.append(("d", x.detach())) or judge(x, d))
    task.train(load_task_data(tiny_sites[0], CONFIG), steps=1, seed=0)

    kinds = [name for name, _ in seen]
    assert kinds.count("l1") == 2 * 2 * 2 and kinds.count("tv") == 2 and kinds.count("d") >= 2 * 3
    for name, tensor in seen:  # per pool: cycle and identity (2 tensors each), TV, D on real, fake, fake
        assert tensor.shape[1] == 2, name
        torch.testing.assert_close(tensor[:, 1:], task.in_window(tensor[:, :1]), msg=name)


def test_the_identity_weight_reaches_the_generator_loss(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[0], CONFIG)

    def trained(weight: float) -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        task = build_task(replace_task(CONFIG, **{"identity_weight": weight}))
        task.train(data, steps=2, seed=0)
        return task.get_weights()

    first, again, other = trained(5.0), trained(5.0), trained(0.0)
    assert all(np.array_equal(v, again[k]) for k, v in first.items())  # seeded: only the weight differs
    assert any(not np.array_equal(v, other[k]) for k, v in first.items() if k.startswith("generator."))


def test_total_variation_scores_noise_not_flat_regions() -> None:
    from medgan_core.tasks.cycle import pooled, total_variation

    flat = torch.zeros(2, 1, 8, 8)
    step = flat.clone()
    step[..., 4:] = 1.0  # one vertical edge: a jump of 1 in 1 of 7 column pairs, on every row
    assert float(total_variation(flat)) == 0.0
    assert float(total_variation(step)) == pytest.approx(1 / 7)
    noisy = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    assert float(total_variation(noisy)) > 0.15  # about 2 * 0.1 * 2 / sqrt(pi) for white noise
    blocks = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(pooled(blocks, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert pooled(blocks, 1) is blocks


def test_tv_weight_smooths_the_translation_and_cycle_pool_reaches_the_loss(tiny_sites: list[Path]) -> None:
    """Seeded runs that differ only in tv-weight (or cycle-pool) train different generators,
    and a heavy TV weight leaves the harmonised held-out slices with less pixel-to-pixel
    variation in the window than the same training without it."""
    from medgan_core.tasks.cycle import total_variation

    data = load_task_data(tiny_sites[0], CONFIG)

    def trained(**settings: float) -> tuple[dict[str, np.ndarray], float, dict[str, float]]:
        torch.manual_seed(0)
        task = build_task(replace_task(CONFIG, **{"identity_weight": 0.0, **settings}))
        losses = task.train(data, steps=12, seed=0)
        with torch.no_grad():
            roughness = float(total_variation(task.in_window(task.restore(data.test_input))))
        return task.get_weights(), roughness, losses

    plain, plain_tv, losses = trained()
    pooled_weights, _, _ = trained(cycle_pool=2)
    _, smooth_tv, _ = trained(tv_weight=500.0)
    assert "loss-tv" in losses and "loss-identity" not in losses  # identity off: not computed
    assert any(not np.array_equal(v, pooled_weights[k]) for k, v in plain.items() if k.startswith("generator."))
    assert smooth_tv < plain_tv


def test_unpaired_domains_at_clinical_geometry_keep_pixels_range_and_subjects(
        tiny_sites: list[Path], tmp_path: Path) -> None:
    """The data the cycle task reads at clinical geometry: both scanners' slices at the site's own pixels over the whole CT range, from disjoint
    subjects, the held-out pairs aligned; kept memory-mapped in the site's cache and reused."""
    from medgan_core.data.dataset import UnpairedDomains, load_site_data
    from medgan_core.data.preprocess import CT_FULL_RANGE

    spec = UnpairedDomains("scanner-b", clinical=True)
    config = replace_task(CONFIG, spacing=0.0)
    cache = tmp_path / "cache"
    data = load_site_data(tiny_sites[1], config, spec, cache_dir=cache)
    assert data.train.shape == (12, 1, 128, 128) and data.train_input is not None
    assert data.train_input.shape == (8, 1, 128, 128)
    assert torch.equal(load_task_data(tiny_sites[1], config).train, data.train)  # what the task reads
    assert data.test_input is not None and data.test_input.shape == data.test.shape
    low, high = CT_FULL_RANGE
    hu = (data.train.float() + 1) / 2 * (high - low) + low
    assert float(hu.min()) < -900 and float(hu.max()) > 400  # air and bone, not clipped to a window
    assert any(cache.glob("train-a-*.npy")) and any(cache.glob("train-scanner-b-*.npy"))
    again = load_site_data(tiny_sites[1], config, spec, cache_dir=cache)
    assert torch.equal(again.train_input, data.train_input)
