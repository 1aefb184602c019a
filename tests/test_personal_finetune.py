"""Personal fine-tuning (``aggregation.finetune-steps``): after its last round a site trains on
from the federated model and keeps the result. The update it sends is unchanged by it, the
personal model never leaves, its steps are accounted under DP and planned into the noise,
and the site's evaluation and ``medgan export --site-state`` use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgan_core.checkpoints import save_checkpoint
from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.errors import ConfigError
from medgan_core.model_file import load_model
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.site_round import accountant_path, load_site_model, shared_weights, train_site_round
from medgan_core.site_state import SiteState
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data, task_config
from server.export import export_model
from server.privacy_report import privacy_report
from server.report import aggregation_line
from server.run_folder import RunFolder

DENOISE = task_config(name="denoise", image_size=16, width=8, batch_size=8, local_steps=3,
                      lr_generator=2e-3, lr_discriminator=2e-3)


def _round(site: Path, state_dir: Path, agg: AggregationConfig, server_round: int, privacy: PrivacyConfig,
           planned: int = 2) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    task = build_task(DENOISE)
    data = load_task_data(site, DENOISE)
    config = SiteConfig(str(site), state_dir=str(state_dir))
    metrics = train_site_round(task, data, config, privacy, planned_rounds=planned, study_id="s", seed=5,
                               aggregation=agg, server_round=server_round)
    return shared_weights(task, agg)[0], metrics


def test_the_last_round_keeps_a_personal_model_and_sends_what_it_would_have_sent(tiny_sites: list[Path],
                                                                                tmp_path: Path) -> None:
    off = PrivacyConfig(enabled=False)
    plain, _ = _round(tiny_sites[0], tmp_path / "plain", AggregationConfig(keep_optimizer_state=True), 2, off)
    tuned_agg = AggregationConfig(keep_optimizer_state=True, finetune_steps=4)
    sent, _ = _round(tiny_sites[0], tmp_path / "tuned", tuned_agg, 2, off)
    assert sent.keys() == plain.keys()
    for name in plain:  # the fine-tune changes nothing the coordinator receives
        np.testing.assert_array_equal(sent[name], plain[name])

    saved = SiteState(tmp_path / "tuned", "s").latest(before=3)
    assert saved is not None and saved.server_round == 2 and saved.personal.keys() == sent.keys()
    assert any(not np.array_equal(saved.personal[n], sent[n]) for n in sent)  # it trained on

    evaluated = build_task(DENOISE)  # the site evaluates round 2 with its personal model
    load_site_model(evaluated, SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "tuned")), tuned_agg,
                    study_id="s", server_round=2, training=False)
    for name, value in evaluated.get_weights().items():
        np.testing.assert_array_equal(value, saved.personal[name])


def test_only_the_last_round_fine_tunes(tiny_sites: list[Path], tmp_path: Path) -> None:
    agg = AggregationConfig(finetune_steps=4)
    _round(tiny_sites[0], tmp_path, agg, 1, PrivacyConfig(enabled=False), planned=3)
    saved = SiteState(tmp_path, "s").latest(before=2)
    assert saved is not None and not saved.personal


def test_under_dp_the_fine_tune_is_accounted_and_planned(tiny_sites: list[Path], tmp_path: Path) -> None:
    privacy = PrivacyConfig(enabled=True, secure_rng=False, target_epsilon=8.0)
    agg = AggregationConfig(finetune_steps=5)
    for server_round in (1, 2):
        _, metrics = _round(tiny_sites[0], tmp_path, agg, server_round, privacy)
    accountant = SiteAccountant(privacy.accountant, privacy.delta, accountant_path(tmp_path, "s"))
    assert accountant.steps == 2 * DENOISE.local_steps + 5 == metrics["dp-steps"]
    assert metrics["epsilon"] == pytest.approx(accountant.epsilon())
    assert metrics["epsilon"] <= privacy.target_epsilon * 1.001  # the noise was planned for these steps too

    # Planned for the extra steps: more noise than a study without them, for the same budget.
    _, without = _round(tiny_sites[0], tmp_path / "none", AggregationConfig(), 1, privacy)
    assert metrics["noise-multiplier"] > without["noise-multiplier"]


def test_export_at_the_site_takes_its_personal_model(tiny_sites: list[Path], tmp_path: Path) -> None:
    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 8,
                                        "local_steps": 3}, aggregation={"finetune_steps": 4}, run={"rounds": 1})
    folder = RunFolder(tmp_path / "run").start(study)
    agg = study.aggregation
    state_dir = tmp_path / "site-state"
    task = build_task(study.task)
    train_site_round(task, load_task_data(tiny_sites[0], study.task),
                     SiteConfig(str(tiny_sites[0]), state_dir=str(state_dir)), PrivacyConfig(enabled=False),
                     planned_rounds=1, study_id=folder.study_id(), seed=5, aggregation=agg, server_round=1)
    save_checkpoint(folder.checkpoint(1), task.get_weights(), {"round": 1, "study": study.to_dict()})
    folder.append_metrics({"round": 1, "sites": [{"node": 1, "train": {}}], "evaluate": {}})

    personal = SiteState(state_dir, folder.study_id()).latest(before=2).personal
    at_site = load_model(export_model(folder.root, tmp_path / "site.medgan", site_state=state_dir))
    assert "personal model" in at_site.provenance["site-kept-layers"]
    assert at_site.provenance["aggregation"]["finetune-steps"] == 4
    for name, value in personal.items():
        np.testing.assert_array_equal(at_site.arrays[name], value)
    shared = load_model(export_model(folder.root, tmp_path / "shared.medgan"))  # the coordinator's: the federated one
    assert any(not np.array_equal(shared.arrays[n], personal[n]) for n in personal)
    assert "plus 4 steps of each site's personal fine-tune" in privacy_report(folder)  # what ε covers, said


def test_finetune_steps_are_validated_and_reported() -> None:
    with pytest.raises(ConfigError, match="aggregation.finetune-steps = -1"):
        AggregationConfig(finetune_steps=-1).validate()
    assert AggregationConfig(finetune_steps=1).has_site_state
    study = StudyConfig().replace(task={"name": "denoise"}, aggregation={"finetune_steps": 50})
    assert "fine-tunes its model for 50 steps" in aggregation_line(study)
