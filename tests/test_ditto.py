"""Ditto personal models (``aggregation.ditto-steps``): every round a site also trains its own
model, pulled towards the global one, and keeps it. What it sends is unchanged by it, the
personal model carries over from round to round and never leaves, its steps are accounted
under DP and planned into the noise, the site's evaluation and export use it, and
``medgan study compare`` gives local-only and pooled training the same steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgan.compare import _markdown, steps_a_round
from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.checkpoints import save_checkpoint
from medgan_core.errors import ConfigError, WeightsError
from medgan_core.model_file import load_model
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.site_round import accountant_path, load_site_model, shared_weights, train_site_round
from medgan_core.site_state import SiteState
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data, task_config
from server.export import _personal_words, export_model
from server.privacy_report import privacy_report
from server.report import aggregation_line
from server.run_folder import RunFolder

LR = 2e-3
DENOISE = task_config(name="denoise", image_size=16, width=8, batch_size=8, local_steps=3,
                      lr_generator=LR, lr_discriminator=LR)
OFF = PrivacyConfig(enabled=False)


def _round(site: Path, state_dir: Path, agg: AggregationConfig, server_round: int, privacy: PrivacyConfig = OFF,
           start: dict[str, np.ndarray] | None = None, planned: int = 3
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """One round at ``site`` from the global model ``start`` (default: the seeded initial
    one): what it received, what it sends, and its metrics."""
    task = build_task(DENOISE)
    if start is not None:
        task.set_weights(start)
    received = task.get_weights()
    metrics = train_site_round(task, load_task_data(site, DENOISE), SiteConfig(str(site), state_dir=str(state_dir)),
                               privacy, planned_rounds=planned, study_id="s", seed=5, aggregation=agg,
                               server_round=server_round)
    return received, shared_weights(task, agg)[0], metrics


def _personal(state_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    saved = SiteState(state_dir, "s").latest(before=server_round + 1)
    assert saved is not None and saved.server_round == server_round
    return saved.personal


def test_every_round_keeps_a_personal_model_and_sends_what_plain_fedavg_sends(tiny_sites: list[Path],
                                                                              tmp_path: Path) -> None:
    _, plain, _ = _round(tiny_sites[0], tmp_path / "plain", AggregationConfig(keep_optimizer_state=True), 1)
    agg = AggregationConfig(keep_optimizer_state=True, ditto_steps=4, ditto_lambda=10.0)
    received, sent, _ = _round(tiny_sites[0], tmp_path / "ditto", agg, 1)
    for name in plain:  # the personal model changes nothing the coordinator receives
        np.testing.assert_array_equal(sent[name], plain[name])
    # and what the site keeps for its next round's update is the sent model's Adam, not the personal one's
    kept = SiteState(tmp_path / "ditto", "s").latest(before=2).optimizer
    plain_kept = SiteState(tmp_path / "plain", "s").latest(before=2).optimizer
    assert kept.keys() == plain_kept.keys() and kept
    for name in kept:
        np.testing.assert_array_equal(kept[name], plain_kept[name])

    first = _personal(tmp_path / "ditto", 1)
    assert first.keys() == sent.keys()
    assert any(not np.array_equal(first[n], sent[n]) for n in sent)  # its own model, not the update
    assert any(not np.array_equal(first[n], received[n]) for n in sent)  # and it trained

    evaluated = build_task(DENOISE)  # the site evaluates round 1 with its personal model
    load_site_model(evaluated, SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "ditto")), agg,
                    study_id="s", server_round=1, training=False)
    for name, value in evaluated.get_weights().items():
        np.testing.assert_array_equal(value, first[name])

    skipped = build_task(DENOISE)  # a round it sat out: still its latest personal model, not the global one
    load_site_model(skipped, SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "ditto")), agg,
                    study_id="s", server_round=2, training=False)
    for name, value in skipped.get_weights().items():
        np.testing.assert_array_equal(value, first[name])

    # Round 2 starts the personal model where round 1 left it, not from the new global model:
    # the same round 2 at a site whose state lost its personal model ends elsewhere.
    _round(tiny_sites[0], tmp_path / "ditto", agg, 2, start=sent)
    (tmp_path / "fresh").mkdir()
    SiteState(tmp_path / "fresh", "s").save(1, {}, kept)
    _round(tiny_sites[0], tmp_path / "fresh", agg, 2, start=sent)
    carried, restarted = _personal(tmp_path / "ditto", 2), _personal(tmp_path / "fresh", 2)
    assert any(not np.array_equal(carried[n], restarted[n]) for n in carried)


def test_lambda_pulls_the_personal_model_to_the_global_one(tiny_sites: list[Path], tmp_path: Path) -> None:
    # lr × λ = 1: every step ends exactly on the global model the round received
    received, _, _ = _round(tiny_sites[0], tmp_path / "full", AggregationConfig(ditto_steps=3, ditto_lambda=1 / LR), 1)
    full = _personal(tmp_path / "full", 1)
    params = {f"generator.{n}" for n, _ in build_task(DENOISE).groups["generator"].named_parameters()}
    for name in params:
        np.testing.assert_allclose(full[name], received[name], rtol=0, atol=1e-7)

    def distance(lam: float) -> float:
        folder = tmp_path / f"lam-{lam:g}"
        _round(tiny_sites[0], folder, AggregationConfig(ditto_steps=6, ditto_lambda=lam), 1)
        personal = _personal(folder, 1)
        return sum(float(np.sum((personal[n] - received[n]) ** 2)) for n in params)

    assert 0 < distance(100.0) < distance(1e-3)  # a stronger pull keeps it nearer


def test_under_dp_the_personal_steps_are_accounted_and_planned(tiny_sites: list[Path], tmp_path: Path) -> None:
    privacy = PrivacyConfig(enabled=True, secure_rng=False, target_epsilon=8.0)
    agg = AggregationConfig(ditto_steps=2, ditto_lambda=10.0)
    sent = None
    for server_round in (1, 2, 3):
        _, sent, metrics = _round(tiny_sites[0], tmp_path, agg, server_round, privacy, start=sent)
    accountant = SiteAccountant(privacy.accountant, privacy.delta, accountant_path(tmp_path, "s"))
    assert accountant.steps == 3 * (DENOISE.local_steps + 2) == metrics["dp-steps"]
    assert metrics["epsilon"] == pytest.approx(accountant.epsilon())
    assert metrics["epsilon"] <= privacy.target_epsilon * 1.001  # the noise was planned for these steps too
    assert _personal(tmp_path, 3)

    _, _, without = _round(tiny_sites[0], tmp_path / "none", AggregationConfig(), 1, privacy)
    assert metrics["noise-multiplier"] > without["noise-multiplier"]  # more steps on the same budget: more noise


def test_ditto_settings_are_validated_and_reported(tiny_sites: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="aggregation.ditto-steps = -1"):
        AggregationConfig(ditto_steps=-1).validate()
    with pytest.raises(ConfigError, match="aggregation.ditto-lambda = 0"):
        AggregationConfig(ditto_steps=5, ditto_lambda=0.0).validate()
    with pytest.raises(ConfigError, match="ditto-steps and aggregation.finetune-steps"):
        AggregationConfig(ditto_steps=5, finetune_steps=5).validate()
    assert AggregationConfig(ditto_steps=5).has_site_state and not AggregationConfig().has_site_state

    capped = SiteConfig(str(tiny_sites[0]), max_steps_per_round=10)
    assert capped.work_refusal(task_config(local_steps=6), 0, 4) == ""
    assert capped.work_refusal(task_config(local_steps=6), 0, 5) == (
        f"site {capped.site_name} runs at most 10 training steps a round (max-steps-per-round), the study asks for "
        "6 local steps + 5 steps of its Ditto personal model; refused by the site's policy")

    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 8,
                                        "local_steps": 3}, aggregation={"ditto_steps": 4, "ditto_lambda": 50.0},
                                  privacy={"enabled": True}, run={"rounds": 2})
    assert "Ditto personal model for 4 steps" in aggregation_line(study) and "λ = 50" in aggregation_line(study)
    folder = RunFolder(tmp_path / "run").start(study)
    folder.append_metrics({"round": 1, "sites": [{"node": 1, "train": {}}], "evaluate": {}})
    assert "and 4 steps of each site's Ditto personal model (accounted in its ε" in privacy_report(folder)
    assert _personal_words(study, 2, 4) == ("its Ditto model as of round 2 (4 steps a round on its own data, each "
                                            "pulled towards the global model, λ = 50)")
    assert steps_a_round(study) == 7


def test_compare_gives_local_and_pooled_the_personal_steps_and_says_so() -> None:
    results = {"task": "denoise", "headline": "psnr", "privacy": False, "rounds": 2, "local-steps": 3,
               "ditto-steps": 4, "sites": ["a"], "scores": {arm: {"a": {"psnr": 30.0, "psnr-input": 20.0}}
                                                             for arm in ("federated", "local only", "pooled")},
               "leave-one-out": {}, "epsilon-utility": [], "seconds": {}}
    text = _markdown(results)
    assert ("2 rounds × 3 local steps and 4 steps of each site's Ditto personal model (local only and pooled: "
            "7 steps a round)") in text
    del results["ditto-steps"]  # a results.json from before Ditto reads as it did
    assert "Ditto" not in _markdown(results)


def test_compare_trains_the_local_only_arm_on_the_personal_steps_too(tiny_sites: list[Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import medgan.compare as compare

    study = StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu"},
        task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 4, "local_steps": 3},
        privacy={"enabled": False}, aggregation={"ditto_steps": 4, "ditto_lambda": 10.0})
    arms: list[StudyConfig] = []

    class Stop(Exception):
        pass

    def record(arm_study: StudyConfig, *_: object, **__: object) -> None:
        arms.append(arm_study)

    def pooled(arm_study: StudyConfig, data: list) -> None:
        arms.append(arm_study)
        raise Stop

    monkeypatch.setattr(compare, "simulate_federation", record)
    monkeypatch.setattr(compare, "site_models", lambda *a, **k: {})
    monkeypatch.setattr(compare, "pooled_model", pooled)
    with pytest.raises(Stop):
        compare.compare_study(study, tiny_sites, tmp_path / "cmp", progress=lambda _: None)
    federated, local, pooled_study = arms
    assert federated.aggregation.ditto_steps == 4 and federated.task.local_steps == 3
    assert local.aggregation.ditto_steps == 0 and local.task.local_steps == 7  # one model, the same work
    assert compare.steps_a_round(pooled_study) == 7


def test_export_at_the_site_takes_its_latest_ditto_model_and_a_foreign_one_is_refused(tiny_sites: list[Path],
                                                                                     tmp_path: Path) -> None:
    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 8,
                                        "local_steps": 3}, aggregation={"ditto_steps": 4}, run={"rounds": 2})
    folder = RunFolder(tmp_path / "run").start(study)
    state_dir = tmp_path / "site-state"
    task = build_task(study.task)
    train_site_round(task, load_task_data(tiny_sites[0], study.task),
                     SiteConfig(str(tiny_sites[0]), state_dir=str(state_dir)), OFF, planned_rounds=2,
                     study_id=folder.study_id(), seed=5, aggregation=study.aggregation, server_round=1)
    for server_round in (1, 2):  # the site sat round 2 out; the coordinator's model moved on
        save_checkpoint(folder.checkpoint(server_round), task.get_weights(), {"round": server_round,
                                                                             "study": study.to_dict()})
        folder.append_metrics({"round": server_round, "sites": [{"node": 1, "train": {}}], "evaluate": {}})
    personal = SiteState(state_dir, folder.study_id()).latest(before=3).personal
    at_site = load_model(export_model(folder.root, tmp_path / "site.medgan", site_state=state_dir))
    assert "its Ditto model as of round 2" in at_site.provenance["site-kept-layers"]
    for name, value in personal.items():
        np.testing.assert_array_equal(at_site.arrays[name], value)
    shared = load_model(export_model(folder.root, tmp_path / "shared.medgan"))
    assert any(not np.array_equal(shared.arrays[n], personal[n]) for n in personal)

    # A personal model of another network in the state folder is refused by name, not trained on.
    SiteState(state_dir, folder.study_id()).save(1, {}, {}, {"generator.other": np.zeros(3, np.float32)}, 4)
    with pytest.raises(WeightsError, match="Ditto personal model in"):
        train_site_round(build_task(study.task), load_task_data(tiny_sites[0], study.task),
                         SiteConfig(str(tiny_sites[0]), state_dir=str(state_dir)), OFF, planned_rounds=2,
                         study_id=folder.study_id(), seed=5, aggregation=study.aggregation, server_round=2)
