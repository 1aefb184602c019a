"""MR -> CT translation (pix2pix): aligned pairs of the same subject, a model that learns HU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation_checks import site_without
from medgan_core.errors import DataError
from medgan_core.tasks.registry import build_task
from medgan_core.data.preprocess import CT_FULL_RANGE, to_hu
from medgan_core.tasks.registry import load_task_data, replace_task, task_config

CONFIG = task_config(name="translate", image_size=32, width=8, batch_size=8, local_steps=3, lr_generator=2e-3,
                    lr_discriminator=2e-3)


def test_mr_inputs_and_ct_targets_are_the_same_anatomy(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.train_input is not None and data.train_input.shape == data.train.shape
    air_mr, air_ct = data.train_input < -0.9, to_hu(data.train, *CT_FULL_RANGE) < -900  # CT over its whole range
    assert float((air_mr == air_ct).float().mean()) > 0.85  # the body outlines coincide
    assert not torch.allclose(data.train_input, data.train)  # different contrasts


def test_subjects_without_the_other_modality_are_a_clear_error(tmp_path: Path, tiny_sites: list[Path]) -> None:
    site = site_without(tiny_sites[0], tmp_path, ",MR,")
    with pytest.raises(DataError, match="no train subjects with both a MR and a CT series"):
        load_task_data(site, CONFIG)


def test_translation_learns_hounsfield_units(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    task = build_task(CONFIG)
    before = task.evaluate(data)
    task.train(data, steps=80, seed=0)
    after = task.evaluate(data)
    assert after["mae-hu"] < 0.5 * before["mae-hu"]
    assert after["psnr"] > after["psnr-input"] + 2.0 and after["ssim"] > before["ssim"]  # (the MR is no CT estimate)


def test_the_translator_is_not_residual_and_learns_the_air_too() -> None:
    task = build_task(CONFIG)
    assert not task.generator.residual and task.patches_anywhere > 0  # an MR value is no starting HU
    assert build_task(task_config(name="denoise")).generator.residual


def test_preview_and_clinical_size() -> None:
    task = build_task(replace_task(CONFIG, spacing=3.125))
    grid = task.preview(2)
    assert grid.shape == (6, 1, 128, 128)  # whole 400 mm phantom slices at the task's 3.125 mm
    assert not np.allclose(grid[0].numpy(), grid[2].numpy())  # MR beside CT
    assert task.restore(torch.zeros(1, 1, 512, 512)).shape == (1, 1, 512, 512)


@pytest.mark.slow
def test_translate_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="translate", image_size=16)
    assert all({"psnr", "ssim", "mae-hu"} <= set(m) for m in site_metrics(records))
