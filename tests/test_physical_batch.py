"""Large logical batches in bounded memory (``task.physical-batch``): a step's batch passes
through the networks in parts, and the update is the one the whole batch would give: with
and without DP (where each part's per-sample gradients are clipped and summed, and the
noise is added once, as Opacus' BatchMemoryManager does), for every kind of GAN task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from medgan_core.errors import ConfigError
from medgan_core.privacy import DPSettings, SiteAccountant
from medgan_core.privacy.ghost import GhostDPOptimizer
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.base import TrainingSetup
from medgan_core.tasks.registry import build_task, load_task_data, replace_task, task_config

PART = 3  # records a pass may hold in these tests; the Poisson batches below hold about 8
CONFIGS = {
    "denoise": task_config(name="denoise", image_size=16, width=8, batch_size=8, lr_generator=2e-3,
                           lr_discriminator=2e-3),
    "cycle": task_config(name="cycle", image_size=16, width=8, batch_size=8, lr_generator=2e-3,
                         lr_discriminator=2e-3),
    "conditional": task_config(name="conditional", image_size=16, width=8, batch_size=8, z_dim=8,
                               lr_generator=2e-3, lr_discriminator=2e-3),
}
# Noise on, drawn from a seeded generator: the parts must give the same clipped sums and the
# same noise as the whole batch, with every gradient clipped (a tiny norm bound) and with none.
DP = DPSettings(noise_multiplier=0.5, max_grad_norm=0.01, sample_rate=0.6, expected_batch_size=8, secure_rng=False)
MODES = {"plain": None, "dp": DP, "dp-unclipped": dataclasses.replace(DP, max_grad_norm=1e4)}


def _largest_pass(task: object) -> dict[str, int]:
    """Record the most rows any forward pass of each network held (forward pre-hooks)."""
    largest = {"generator": 0, "discriminator": 0}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_module: nn.Module, args: tuple) -> None:
            largest[name] = max(largest[name], args[0].shape[0])
        return record

    for name, module in task.groups.items():  # type: ignore[attr-defined]
        module.register_forward_pre_hook(hook(name))
    return largest


def test_parts_cover_the_batch_in_whole_records() -> None:
    setup = TrainingSetup(nn.Identity(), nn.Identity(), None, None, None, None, physical_batch=4)  # type: ignore[arg-type]
    parts = setup.parts(10)
    assert [(p.rows.start, p.rows.stop) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    assert [p.share for p in parts] == [0.4, 0.4, 0.2]
    assert [p.last for p in parts] == [False, False, True]
    views = setup.parts(5, rows_per_record=3)  # a record's views stay in one part
    assert [(p.rows.start, p.rows.stop) for p in views] == [(0, 12), (12, 15)]
    assert [p.share for p in views] == [0.8, 0.2]
    for physical in (0, 10, 64):
        whole = TrainingSetup(nn.Identity(), nn.Identity(), None, None, None, None, physical).parts(10)  # type: ignore[arg-type]
        assert len(whole) == 1 and whole[0].rows == slice(0, 10) and whole[0].share == 1.0 and whole[0].last


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_step_in_parts_equals_the_step_on_the_whole_batch(
    tiny_sites: list[Path], monkeypatch: pytest.MonkeyPatch, name: str, mode: str
) -> None:
    dp, private = MODES[mode], MODES[mode] is not None
    config = CONFIGS[name]
    data = load_task_data(tiny_sites[1], config)
    clipped: list[int] = []
    original_clip = GhostDPOptimizer.clip_and_accumulate

    def recording_clip(self):  # type: ignore[no-untyped-def]
        clipped.append(self.records_in_batch())
        return original_clip(self)

    monkeypatch.setattr(GhostDPOptimizer, "clip_and_accumulate", recording_clip)

    def trained(physical: int) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, float], SiteAccountant]:
        task = build_task(replace_task(config, physical_batch=physical))
        largest = _largest_pass(task)
        accountant = SiteAccountant()
        losses = task.train(data, steps=2, seed=3, dp=dp, accountant=accountant)
        return task.get_weights(), largest, losses, accountant

    whole, whole_largest, whole_losses, whole_accountant = trained(0)
    whole_clips = list(clipped)
    clipped.clear()
    parts, parts_largest, parts_losses, parts_accountant = trained(PART)

    # (a synthesis discriminator's rows are the real records and then its generated images,
    # split into parts alike)
    assert whole_largest["generator"] > PART  # the whole batch did not fit in one part...
    for network, largest in parts_largest.items():  # ...and in parts no pass held more
        assert 0 < largest <= PART, network
    for key in whole:  # to rounding: 2e-5 is 1 % of one Adam step at lr 2e-3
        np.testing.assert_allclose(parts[key], whole[key], rtol=2e-4, atol=2e-5, err_msg=key)
    assert parts_losses.keys() == whole_losses.keys()
    for key in whole_losses:
        assert parts_losses[key] == pytest.approx(whole_losses[key], rel=1e-4, abs=1e-6), key
    if private:
        # the same records clipped, part by part, and the steps accounted as before
        assert whole_clips and max(whole_clips) > PART
        assert sum(clipped) == sum(whole_clips) and max(clipped) <= PART
        assert parts_accountant.steps == whole_accountant.steps == 2
        assert parts_accountant.epsilon() == pytest.approx(whole_accountant.epsilon())
    else:
        assert not clipped and not whole_clips


def test_views_stay_together_across_parts(tiny_sites: list[Path]) -> None:
    """Two views of each record, parts of three records: six rows a pass, and the update is the
    whole batch's (each record's two views averaged before clipping, in whichever part)."""
    config = replace_task(CONFIGS["denoise"], views_per_record=2)
    data = load_task_data(tiny_sites[1], config)
    results = []
    for physical in (0, PART):
        task = build_task(replace_task(config, physical_batch=physical))
        largest = _largest_pass(task)
        task.train(data, steps=2, seed=3, dp=DP, accountant=SiteAccountant())
        results.append((task.get_weights(), largest))
    (whole, whole_largest), (parts, parts_largest) = results
    assert whole_largest["generator"] > 2 * PART and parts_largest["generator"] == 2 * PART
    for key in whole:
        np.testing.assert_allclose(parts[key], whole[key], rtol=2e-4, atol=2e-6, err_msg=key)


def test_physical_batch_is_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="task.physical-batch = -1; give the most records one pass may hold"):
        StudyConfig().replace(task={"physical_batch": -1})
    assert StudyConfig().replace(task={"name": "translate", "physical_batch": 16}).task.physical_batch == 16


def test_a_deployed_site_trains_in_its_own_parts(tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``physical-batch`` in a hospital's node config bounds the passes of the round it trains,
    whatever the study's task says; the round still trains and replies."""
    from flwr.app import Context, MessageType, RecordDict

    import client.app
    from client.app import build_client_app
    from client_messages import client_request, round_config

    study = tiny_study.replace(task={"name": "denoise", "batch_size": 8, "physical_batch": 0},
                               privacy={"enabled": False})
    built: list[dict[str, int]] = []

    def build_and_watch(config, device):  # type: ignore[no-untyped-def]
        task = build_task(config, device)
        built.append(_largest_pass(task))
        return task

    monkeypatch.setattr(client.app, "build_task", build_and_watch)
    node = {"data-path": str(tiny_sites[0]), "state-dir": str(tmp_path / "state"), "physical-batch": "3",
            "require-dp": "false", "require-secure-rng": "false", "release-test-metrics": "true"}
    request = client_request(MessageType.TRAIN, round_config(study, "parts"), build_task(study.task).get_weights())
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    reply = build_client_app()(request, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert built and built[0]["generator"] == 3 and built[0]["discriminator"] == 3
