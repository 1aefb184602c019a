"""2.5D inputs (``task.context-slices``): the networks read each slice with its neighbours of
the same series as extra channels, in training, evaluation, previews and ``medgan infer``;
never a neighbour from another subject, and never under DP (a slice would be in its
neighbours' records too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.data.dataset import SiteData
from medgan_core.data.slice_store import context_rows, gather_context, random_crops
from medgan_core.errors import ConfigError, DataError, PrivacyError
from medgan_core.site_round import train_site_round
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data, task_config

CONTEXT = task_config(name="denoise", image_size=32, width=8, batch_size=4, local_steps=2, context_slices=1)


class PreviousSlice(nn.Module):
    """A stand-in generator whose output is its input's second channel: the slice before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:2]


def test_context_rows_stay_inside_each_series() -> None:
    rows = context_rows(torch.tensor([3, 2]), torch.arange(5), 1)
    assert rows.tolist() == [[0, 0, 1], [1, 0, 2], [2, 1, 2], [3, 3, 4], [4, 3, 4]]
    two = context_rows(torch.tensor([4]), torch.tensor([1]), 2)
    assert two.tolist() == [[1, 0, 2, 0, 3]]  # centre, -1, +1, -2 (clamped to the first), +2
    with pytest.raises(IndexError, match="outside the 5 slices"):
        context_rows(torch.tensor([3, 2]), torch.tensor([5]), 1)
    images = torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 1, 2, 2)
    assert gather_context(images, rows)[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 0, 2], [2, 1, 2], [3, 3, 4],
                                                                   [4, 3, 4]]


def test_patches_of_neighbours_are_cut_at_the_same_place() -> None:
    images = torch.randn(6, 1, 40, 40)
    idx = torch.tensor([2, 5])
    rows = context_rows(torch.tensor([3, 3]), idx, 1)
    low, full = random_crops([images, images + 0], idx, 16, torch.Generator().manual_seed(3), neighbours={0: rows})
    assert low.shape == (2, 3, 16, 16) and full.shape == (2, 1, 16, 16)
    for record, row in enumerate(rows.tolist()):
        place = next((t, l) for t in range(25) for l in range(25)
                     if torch.equal(full[record, 0], images[idx[record], 0, t:t + 16, l:l + 16]))
        t, l = place
        for channel, source in enumerate(row):
            assert torch.equal(low[record, channel], images[source, 0, t:t + 16, l:l + 16])
    small, _ = random_crops([torch.zeros(3, 1, 10, 10), torch.zeros(3, 1, 10, 10)], torch.tensor([0]), 16,
                            torch.Generator().manual_seed(0), neighbours={0: context_rows(torch.tensor([3]),
                                                                                          torch.tensor([0]), 1)})
    assert small.shape == (1, 3, 16, 16)  # padded with air like a single slice


def test_a_site_trains_and_scores_with_neighbouring_slices(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[0], CONTEXT)
    assert data.train_series is not None and data.train_series.tolist() == [4, 4]  # 2 training subjects × 4 slices
    assert data.test_series is not None and int(data.test_series.sum()) == len(data.test)
    task = build_task(CONTEXT)
    assert task.model_channels == 3
    low, full = task.training_pair(data, torch.tensor([3, 4]), torch.Generator().manual_seed(0))
    assert low.shape == (2, 3, 32, 32) and full.shape == (2, 1, 32, 32)
    # slice 3 is the first subject's last: its "next" neighbour is itself, never subject 2's first
    # slice (4), whose "previous" one is itself in turn
    assert torch.equal(low[0, 0], low[0, 2]) and not torch.equal(low[0, 0], low[0, 1])
    assert torch.equal(low[1, 0], low[1, 1]) and not torch.equal(low[1, 0], low[1, 2])
    metrics = task.train(data, 2, seed=0)
    assert np.isfinite(metrics["loss-g"])
    scores = task.evaluate(data)
    assert np.isfinite(scores["psnr"]) and scores["psnr-input"] == pytest.approx(
        build_task(task_config(name="denoise", image_size=32, width=8)).evaluate(data)["psnr-input"])


def test_evaluation_and_inference_hand_the_generator_each_slices_own_neighbours(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONTEXT)
    assert data.test_input is not None and data.test_series is not None
    task = build_task(CONTEXT)
    task.generator = PreviousSlice()
    task.self_ensemble = False
    previous = context_rows(data.test_series, torch.arange(len(data.test)), 1)[:, 1]
    torch.testing.assert_close(task.restore_series(data.test_input, data.test_series), data.test_input[previous])
    # scored on 5 subjects × 4 slices (chunks of 8 cut across subjects): the scores are those of
    # the slice before each one in its own subject, slice for slice
    many = SiteData(data.site, data.train, data.train, data.train_input, data.train_input,
                    train_series=data.train_series, test_series=data.train_series)
    assert many.test_series is not None and many.test_input is not None and len(many.test_series) == 5
    before = context_rows(many.test_series, torch.arange(len(many.test)), 1)[:, 1]
    plain = build_task(task_config(name="denoise", image_size=32, width=8))
    plain.generator, plain.self_ensemble = nn.Identity(), False
    shifted = SiteData(data.site, data.train, many.test, data.train_input, many.test_input[before])
    own, reference = task.evaluate(many), plain.evaluate(shifted)
    assert {k: v for k, v in own.items() if not k.endswith("-input")} == pytest.approx(
        {k: v for k, v in reference.items() if not k.endswith("-input")})
    scored = torch.tensor([0, 3])
    torch.testing.assert_close(task.restore_series(data.test_input, data.test_series, scored),
                               data.test_input[previous[scored]])
    # a volume of 10 slices restored 8 at a time: slice 8 still reads slice 7, across the chunk's edge
    volume = torch.rand(10, 1, 32, 32) * 2 - 1
    out = task.restore_series(volume)
    torch.testing.assert_close(out[1:], volume[:-1])
    torch.testing.assert_close(out[0], volume[0])


def test_medgan_infer_reads_neighbours_across_its_chunks(tiny_sites: list[Path], tmp_path: Path) -> None:
    from client.infer import Applier
    from medgan_core.model_file import load_model, save_model

    path = save_model(tmp_path / "model.medgan", build_task(CONTEXT).get_weights(), CONTEXT, {"source": "test"})
    model = load_model(path)
    assert model.task.params.context_slices == 1  # type: ignore[attr-defined]
    applier = Applier(model)
    applier.task.generator = PreviousSlice()
    applier.task.self_ensemble = False
    slices = np.stack([np.full((32, 32), 100.0 * k - 500, np.float32) for k in range(11)])
    out = applier.apply(slices, (0.78, 0.78))
    assert out.shape == slices.shape
    np.testing.assert_allclose(out[1:, 16, 16], slices[:-1, 16, 16], atol=1.0)
    np.testing.assert_allclose(out[0, 16, 16], slices[0, 16, 16], atol=1.0)


def test_context_is_refused_under_dp_by_the_study_and_by_the_site(tiny_sites: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="context-slices = 1 puts each slice in its neighbours' records"):
        StudyConfig().replace(task={"name": "denoise", "context_slices": 1}).validate()
    StudyConfig().replace(task={"name": "denoise", "context_slices": 1}, privacy={"enabled": False}).validate()
    # with the patient as the record a slice's neighbours are its own patient's: allowed
    StudyConfig().replace(task={"name": "denoise", "context_slices": 1}, privacy={"unit": "patient"}).validate()
    task = build_task(CONTEXT)
    before = task.get_weights()
    data = load_task_data(tiny_sites[0], CONTEXT)
    site = SiteConfig(str(tiny_sites[0]), name="st-mary", state_dir=str(tmp_path))
    with pytest.raises(PrivacyError, match="site st-mary: task.context-slices = 1"):  # a coordinator that let it through
        train_site_round(task, data, site, PrivacyConfig(target_epsilon=8.0), planned_rounds=1, study_id="s", seed=0)
    assert all(np.array_equal(before[k], v) for k, v in task.get_weights().items())
    assert not list(tmp_path.glob("accountant-*"))


def test_reports_and_model_files_say_the_model_reads_neighbours() -> None:
    from medgan_core.tasks.registry import geometry_words

    assert geometry_words(CONTEXT).endswith("trained on 32×32 patches, each slice read with 1 neighbouring slice on "
                                            "each side (2.5D)")
    assert "neighbouring" not in geometry_words(task_config(name="denoise"))


def test_bad_context_settings_are_refused_in_one_line(tiny_sites: list[Path]) -> None:
    with pytest.raises(ConfigError, match="context-slices = 4; choose 0"):
        task_config(name="denoise", context_slices=4)
    with pytest.raises(ConfigError, match="recon reconstructs each slice from its own k-space"):
        task_config(name="recon", modality="MR", context_slices=1)
    task = build_task(CONTEXT)
    data = load_task_data(tiny_sites[0], CONTEXT)
    data.train_series = None
    with pytest.raises(DataError, match="needs to know which series each slice belongs to"):
        task.training_pair(data, torch.tensor([0]), torch.Generator())
