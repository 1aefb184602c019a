"""Personal fine-tuning (``aggregation.finetune-steps``): after its last round a site trains on
from the federated model and keeps the result. The update it sends is unchanged by it, the
personal model never leaves, its steps are accounted under DP and planned into the noise,
and the site's evaluation and ``medgan export --site-state`` use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medgan_core.checkpoints import save_checkpoint
from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.errors import ConfigError, DataError
from medgan_core.model_file import load_model
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.site_round import accountant_path, load_site_model, shared_weights, train_site_round
from medgan_core.site_state import SiteState
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data, load_task_validation, task_config
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
    assert "fine-tuned for 4 steps on its own data" in at_site.provenance["site-kept-layers"]

    # A model its validation subjects chose after 2 of the 4 steps says so.
    saved = SiteState(state_dir, folder.study_id())
    saved.save(1, {}, {}, personal, personal_steps=2)
    chosen = load_model(export_model(folder.root, tmp_path / "chosen.medgan", site_state=state_dir))
    assert ("fine-tuned for 2 of 4 steps on its own data (the best on its validation subjects)"
            in chosen.provenance["site-kept-layers"])


def test_finetune_steps_are_validated_and_reported() -> None:
    with pytest.raises(ConfigError, match="aggregation.finetune-steps = -1"):
        AggregationConfig(finetune_steps=-1).validate()
    assert AggregationConfig(finetune_steps=1).has_site_state
    study = StudyConfig().replace(task={"name": "denoise"}, aggregation={"finetune_steps": 50})
    assert "fine-tunes its model for 50 steps" in aggregation_line(study)


def _personal(site: Path, state_dir: Path, agg: AggregationConfig, privacy: PrivacyConfig,
              validation: object = None, scores: list[float] | None = None) -> dict[str, np.ndarray]:
    """One last round with a fine-tune; the personal model it kept. ``scores``: what the
    validation score reads, in turn (before the first step, then after every part)."""
    task = build_task(DENOISE)
    if scores is not None:
        given = iter(scores)
        task.validation_score = lambda held_out: next(given)  # type: ignore[method-assign]
    train_site_round(task, load_task_data(site, DENOISE), SiteConfig(str(site), state_dir=str(state_dir)), privacy,
                     planned_rounds=1, study_id="s", seed=5, aggregation=agg, server_round=1,
                     validation=validation)  # type: ignore[arg-type]
    saved = SiteState(state_dir, "s").latest(before=2)
    assert saved is not None and saved.personal
    return saved.personal


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_the_fine_tune_keeps_its_best_model_on_the_sites_validation_subjects(tiny_sites: list[Path],
                                                                             tmp_path: Path) -> None:
    off = PrivacyConfig(enabled=False)
    held_out = load_task_validation(tiny_sites[0], DENOISE)
    assert held_out is not None
    read = lambda: held_out  # noqa: E731
    after = {steps: _personal(tiny_sites[0], tmp_path / f"plain-{steps}", AggregationConfig(
        finetune_steps=steps, finetune_validate_every=0), off) for steps in (2, 4)}
    assert not _same(after[2], after[4])

    # Scored before, after 2 and after 4 steps: the best is kept, whichever it is.
    # Its first part is the first 2 steps of a plain fine-tune; the second part draws anew.
    agg = AggregationConfig(finetune_steps=4, finetune_validate_every=2)
    mid = _personal(tiny_sites[0], tmp_path / "mid", agg, off, read, [0.0, 5.0, 1.0])
    assert _same(mid, after[2])
    steps = lambda name: SiteState(tmp_path / name, "s").latest(before=2).personal_steps  # noqa: E731
    assert (steps("mid"), steps("plain-4")) == (2, 4)  # recorded: the export says how far it went
    end = _personal(tiny_sites[0], tmp_path / "end", agg, off, read, [0.0, 1.0, 5.0])
    assert not _same(end, mid)
    sent, _ = _round(tiny_sites[0], tmp_path / "none", AggregationConfig(), 1, off, planned=1)
    assert not _same(end, sent) and _same(_personal(tiny_sites[0], tmp_path / "end2", agg, off, read,
                                                    [3.0, 4.0, 4.5]), end)
    kept = _personal(tiny_sites[0], tmp_path / "start", agg, off, read, [5.0, 1.0, 0.0])
    for name in sent:  # fine-tuning only made it worse: the round's own model stays
        np.testing.assert_array_equal(kept[name], sent[name])
    assert steps("start") == 0 and steps("end") == 4


def test_the_validation_score_is_the_held_out_psnr_of_the_model(tiny_sites: list[Path]) -> None:
    held_out = load_task_validation(tiny_sites[0], DENOISE)
    data = load_task_data(tiny_sites[0], DENOISE)
    assert held_out is not None
    task = build_task(DENOISE)
    task.train(data, 3, seed=1)
    assert task.self_ensemble
    score = task.validation_score(held_out)
    assert task.self_ensemble  # put back: the site's evaluation still averages the 8 turns
    plain = build_task(DENOISE)
    plain.set_weights(task.get_weights())
    plain.self_ensemble = False  # ranked without the self-ensemble: an eighth of the time
    assert score == pytest.approx(plain.evaluate(held_out)["psnr"])
    assert score != pytest.approx(task.evaluate(held_out)["psnr"])
    assert score != pytest.approx(plain.evaluate(data)["psnr"])  # the validation subjects, not the test ones


def test_validation_reads_the_val_split_only_and_none_where_there_is_none(
        tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medgan_core.data.manifest import read_manifest

    manifest = read_manifest(tiny_sites[0])
    subjects = {split: {e.subject for e in manifest.select(modality="CT", split=split)} for split in ("val", "test")}
    held_out = load_task_validation(tiny_sites[0], DENOISE)
    assert held_out is not None and held_out.test_input is not None and subjects["val"]
    assert held_out.test.shape[0] == 4 * len(subjects["val"])  # 4 slices a subject, the val subjects only
    import medgan_core.data.dataset as dataset

    reads: list[str] = []
    real = dataset._clinical_pairs
    monkeypatch.setattr(dataset, "_clinical_pairs", lambda manifest, task, split, *rest: (
        reads.append(split), real(manifest, task, split, *rest))[1])
    assert torch.equal(load_task_validation(tiny_sites[0], DENOISE).test, held_out.test)
    assert reads == ["val"]  # read once, though it fills both the training and held-out fields
    test = load_task_data(tiny_sites[0], DENOISE).test
    assert held_out.test.shape[1:] == test.shape[1:] and not torch.equal(held_out.test[:1], test[:1])

    no_val = tmp_path / "no-val"
    shutil.copytree(tiny_sites[0], no_val)
    lines = (no_val / "manifest.csv").read_text().splitlines()
    (no_val / "manifest.csv").write_text("\n".join(line for line in lines if ",val," not in line) + "\n")
    assert load_task_validation(no_val, DENOISE) is None


def test_without_validation_subjects_or_under_dp_the_last_model_is_kept(tiny_sites: list[Path], tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    off = PrivacyConfig(enabled=False)
    agg = AggregationConfig(finetune_steps=4, finetune_validate_every=2)
    last = _personal(tiny_sites[0], tmp_path / "last", AggregationConfig(finetune_steps=4, finetune_validate_every=0),
                     off)
    with caplog.at_level("INFO", logger="medgan_core.site_round"):
        assert _same(_personal(tiny_sites[0], tmp_path / "none", agg, off, lambda: None), last)
    assert "no validation subjects; the personal fine-tune keeps its last model" in caplog.text

    def unreadable() -> None:
        raise DataError("val/hospital-a-003.nii.gz: not a NIfTI file")

    with caplog.at_level("INFO", logger="medgan_core.site_round"):  # the round's update still leaves
        assert _same(_personal(tiny_sites[0], tmp_path / "bad", agg, off, unreadable), last)
    assert "validation subjects cannot be read (val/hospital-a-003.nii.gz: not a NIfTI file)" in caplog.text

    def never() -> None:
        raise AssertionError("a DP site read its validation subjects to choose its model")

    private = PrivacyConfig(enabled=True, secure_rng=False, target_epsilon=8.0)
    dp_agg = AggregationConfig(finetune_steps=4)
    full = _personal(tiny_sites[0], tmp_path / "dp-full", dp_agg, private)  # no validation offered at all
    assert dp_agg.finetune_validate_every > 0  # the default asks for it; DP declines
    assert _same(_personal(tiny_sites[0], tmp_path / "dp", dp_agg, private, never), full)


def test_finetune_validate_every_is_validated() -> None:
    with pytest.raises(ConfigError, match="aggregation.finetune-validate-every = -1"):
        AggregationConfig(finetune_validate_every=-1).validate()
    study = StudyConfig().replace(task={"name": "denoise"}, aggregation={"finetune_steps": 50,
                                                                        "finetune_validate_every": 10})
    assert study.aggregation.finetune_validate_every == 10
    assert "the best of it on the site's validation subjects, scored every 10 steps" in aggregation_line(
        study.replace(privacy={"enabled": False}))
    assert "validation" not in aggregation_line(study)  # under DP the last model is kept
    assert "validation" not in aggregation_line(study.replace(privacy={"enabled": False}, task={"name": "cycle"}))


def test_a_sites_client_app_chooses_its_personal_model_on_its_validation_subjects(
        tiny_sites: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import Context, MessageType, RecordDict

    from client.app import build_client_app
    from client_messages import client_request, round_config

    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 8,
                                        "local_steps": 2}, privacy={"enabled": False},
                                  aggregation={"finetune_steps": 4, "finetune_validate_every": 2})
    app = build_client_app([SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "state"))])
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with caplog.at_level("INFO", logger="medgan_core.site_round"):
        reply = app(client_request(MessageType.TRAIN, round_config(study, "s"), build_task(study.task).get_weights()),
                    context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert "personal fine-tune keeps its model after" in caplog.text and "by steps: 0: " in caplog.text
    sent = {key for record in reply.content.metric_records.values() for key in record}
    assert sent and sent <= {"loss-d", "loss-g", "loss-l1", "loss-ssim", "dp", "num-examples"}  # the scores stay


def test_a_state_file_with_a_garbled_step_count_is_refused_in_one_line(tmp_path: Path) -> None:
    from medgan_core.errors import MedGANError
    from safetensors.numpy import save as st_save

    state = SiteState(tmp_path, "s")
    state.save(1, {}, {}, {"generator.w": np.zeros(2, np.float32)}, personal_steps=3)
    assert state.latest(before=2).personal_steps == 3
    state.path(1).write_bytes(st_save({"personal:generator.w": np.zeros(2, np.float32)},
                                      metadata={"round": "1", "personal-steps": "three"}))
    with pytest.raises(MedGANError, match="is unreadable"):
        state.latest(before=2)


def test_a_site_cap_on_steps_counts_the_fine_tune_of_the_last_round(tiny_sites: list[Path], tmp_path: Path) -> None:
    """``max-steps-per-round`` 5 lets rounds of 3 local steps run and refuses the last round,
    whose 4-step fine-tune makes 7, before it trains."""
    from medgan_core.errors import SitePolicyError

    agg = AggregationConfig(finetune_steps=4)
    data = load_task_data(tiny_sites[0], DENOISE)
    site = SiteConfig(str(tiny_sites[0]), name="st-mary", state_dir=str(tmp_path), max_steps_per_round=5)
    off = PrivacyConfig(enabled=False)
    train_site_round(build_task(DENOISE), data, site, off, planned_rounds=2, study_id="s", seed=5, aggregation=agg,
                     server_round=1)
    task = build_task(DENOISE)
    before = task.get_weights()
    with pytest.raises(SitePolicyError, match="asks for 3 local steps [+] 4 fine-tune steps"):
        train_site_round(task, data, site, off, planned_rounds=2, study_id="s", seed=5, aggregation=agg,
                         server_round=2)
    assert all(np.array_equal(before[k], v) for k, v in task.get_weights().items())
    assert SiteState(tmp_path, "s").latest(before=3).server_round == 1  # type: ignore[union-attr]
