"""The benchmarks' shared helpers: behaviour a user relies on when re-scoring a saved run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medgan_core.study_config import StudyConfig, load_study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_common  # noqa: E402
from cycle_adaptation import AGGREGATION, TASK, body_histogram_matched, body_mean_error_hu, describe  # noqa: E402
from privacy_audit import auc, auc_standard_error  # noqa: E402


def test_reuse_without_a_saved_run_stops_instead_of_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = StudyConfig().replace(run={"rounds": 3})
    args = argparse.Namespace(out=tmp_path, reuse=True)

    def must_not_train(*_: object) -> None:
        raise AssertionError("--reuse started a training run")

    monkeypatch.setattr(bench_common, "train_federated", must_not_train)
    with pytest.raises(SystemExit, match="round-003.safetensors does not exist"):
        bench_common.trained_or_reused(args, study, [])
    # A checkpoint from another --rounds does not count either.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "round-005.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="round-003.safetensors does not exist"):
        bench_common.trained_or_reused(args, study, [])


def test_a_finished_run_is_reused_per_run_folder_and_an_unfinished_one_trained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medgan_core.checkpoints import save_checkpoint
    from medgan_core.tasks.registry import build_task

    study = StudyConfig().replace(run={"rounds": 2}, task={"name": "denoise", "width": 8})
    trained: list[Path] = []
    monkeypatch.setattr(bench_common, "train_federated",
                        lambda study, sites, run_dir: trained.append(run_dir) or (build_task(study.task), 12.5))
    args = argparse.Namespace(reuse=True)
    finished, unfinished = tmp_path / "run-a", tmp_path / "run-b"
    weights = build_task(study.task).get_weights()
    save_checkpoint(finished / "checkpoints" / "round-002.safetensors", weights, {})
    (finished / "train-seconds").write_text("321.0\n")
    unfinished.mkdir()
    task, seconds = bench_common.trained_in(args, study, [], finished)
    assert seconds == 321.0 and trained == []
    assert all(np.array_equal(v, weights[k]) for k, v in task.get_weights().items())
    assert bench_common.trained_in(args, study, [], unfinished)[1] == 12.5 and trained == [unfinished]
    assert (unfinished / "train-seconds").read_text() == "12.5\n"  # what a later --reuse reads
    bench_common.trained_in(argparse.Namespace(reuse=False), study, [], finished)
    assert trained == [unfinished, finished]  # without --reuse every run trains


def test_reuse_refuses_a_run_of_other_settings_or_another_start_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from medgan_core.checkpoints import save_checkpoint
    from medgan_core.study_config import dump_study
    from medgan_core.tasks.registry import build_task

    start = tmp_path / "public.medgan"
    start.write_bytes(b"first start")
    study = StudyConfig().replace(run={"rounds": 2}, task={"name": "denoise", "width": 8})
    run_dir = tmp_path / "run"

    def train(study: StudyConfig, sites: list[Path], run_dir: Path) -> tuple[object, float]:
        (run_dir / "config.toml").write_text(dump_study(study))  # what a run folder keeps
        return build_task(study.task), 9.0

    monkeypatch.setattr(bench_common, "train_federated", train)
    run_dir.mkdir()
    warm = study.replace(run={"initial_model": str(start)})
    bench_common.trained_in(argparse.Namespace(reuse=False), warm, [], run_dir)  # trains, records the start
    save_checkpoint(run_dir / "checkpoints" / "round-002.safetensors", build_task(study.task).get_weights(), {})
    reuse = argparse.Namespace(reuse=True)
    assert bench_common.trained_in(reuse, warm, [], run_dir)[1] == 9.0  # the same study: reused
    with pytest.raises(SystemExit, match=r"ran other \[task\] settings"):
        bench_common.trained_in(reuse, warm.replace(task={"l1_weight": 50.0}), [], run_dir)
    with pytest.raises(SystemExit, match=r"ran other \[privacy\] settings"):
        bench_common.trained_in(reuse, warm.replace(privacy={"target_epsilon": 4.0}), [], run_dir)
    start.write_bytes(b"a start made again under the same name")
    with pytest.raises(SystemExit, match="started from another public.medgan"):
        bench_common.trained_in(reuse, warm, [], run_dir)
    with pytest.raises(SystemExit, match="grew from a start file"):  # a cold study is not a warm run's
        bench_common.trained_in(reuse, study, [], run_dir)
    bench_common.trained_in(argparse.Namespace(reuse=False), study, [], run_dir)  # trained cold in its place
    with pytest.raises(SystemExit, match="no record of the start file"):  # its record went with the warm run
        bench_common.trained_in(reuse, warm, [], run_dir)


def test_benchmark_fine_tune_options_default_to_the_studys(monkeypatch: pytest.MonkeyPatch) -> None:
    from medgan_core.config import AggregationConfig

    monkeypatch.setattr(sys, "argv", ["superres_baselines.py"])
    args = bench_common.arguments(None, "out", finetune_steps=300)
    assert (args.finetune_steps, args.finetune_validate_every) == (300, AggregationConfig().finetune_validate_every)
    monkeypatch.setattr(sys, "argv", ["x", "--finetune-steps", "0", "--finetune-validate-every", "0"])
    args = bench_common.arguments(None, "out", finetune_steps=300)
    assert (args.finetune_steps, args.finetune_validate_every) == (0, 0)
    monkeypatch.setattr(sys, "argv", ["x"])
    assert not hasattr(bench_common.arguments(None, "out"), "finetune_steps")  # only where a script asks


def test_the_audit_auc_standard_error_matches_the_spread_of_repeated_attacks() -> None:
    """Hanley–McNeil against 2000 simulated attacks on 64 members / 48 others (AUC ≈ 0.76)."""
    rng = np.random.default_rng(0)
    areas = np.array([auc(rng.normal(1.0, 1.0, 64), rng.normal(0.0, 1.0, 48)) for _ in range(2000)])
    predicted = auc_standard_error(float(areas.mean()), 64, 48)
    assert 0.7 < areas.mean() < 0.8
    assert abs(predicted - areas.std()) < 0.1 * areas.std()
    assert auc_standard_error(0.5, 168, 48) > auc_standard_error(0.5, 1680, 480)


def test_the_cycle_benchmark_mean_error_is_the_offset_inside_the_body_only() -> None:
    """A harmoniser reading 12 HU high inside the body, whatever it does to the air around it
    (images over the whole CT range, -1024 to 3071 HU)."""
    hu = 2047.5  # HU per unit of [-1, 1]
    to_unit = lambda h: (h + 1024.0) / hu - 1.0  # noqa: E731
    target = torch.full((2, 1, 16, 16), -1.0)  # air
    target[:, :, 4:12, 4:12] = to_unit(torch.linspace(-100.0, 1000.0, 64).view(8, 8))  # fat .. bone
    output = target + 12.0 / hu
    output[target == -1.0] = 0.5  # air mapped to tissue: not a calibration offset
    assert body_mean_error_hu(output, target) == pytest.approx(12.0, abs=1e-2)
    assert body_mean_error_hu(target - 7.0 / hu, target) == pytest.approx(-7.0, abs=1e-2)


def test_the_cycle_baseline_matches_the_body_and_leaves_the_air() -> None:
    """Histogram matching inside the body removes a scanner's offset whatever share of each
    slice is air; the air stays where it was."""
    to_unit = lambda h: (h + 1024.0) / 2047.5 - 1.0  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    reference = torch.full((2, 1, 32, 32), -1.0)
    reference[:, :, 4:28, 4:28] = to_unit(40 + 10 * torch.randn(2, 1, 24, 24, generator=generator))
    images = torch.full((1, 1, 32, 32), -1.0)  # less body, more air than the reference
    images[:, :, 10:20, 10:20] = to_unit(90 + 10 * torch.randn(1, 1, 10, 10, generator=generator))
    matched = body_histogram_matched(images, reference)
    assert torch.equal(matched[images == -1.0], images[images == -1.0])
    assert float(matched[:, :, 10:20, 10:20].mean()) == pytest.approx(to_unit(40.0), abs=3 / 2047.5)


def test_the_cycle_example_study_has_the_benchmarks_settings() -> None:
    """sites_example/cycle-harmonise.toml has the settings the README's cycle numbers were measured with."""
    study = load_study(Path(__file__).resolve().parents[1] / "sites_example" / "cycle-harmonise.toml")
    assert study.task.name == "cycle" and study.task.local_steps == 240
    assert all(getattr(study.task, key, None) == value or getattr(study.task.params, key, None) == value
               for key, value in TASK.items())
    assert all(getattr(study.aggregation, key) == value for key, value in AGGREGATION.items())
    assert describe({"local_calibration": True, "cycle_pool": 2}) == "local-calibration = true, cycle-pool = 2"


def test_the_translate_compare_study_trains_what_the_translate_benchmark_trains() -> None:
    """sites_example/translate-compare.toml: the README's comparison table was measured with the
    translate benchmark's own task settings, sites and rounds (its numbers must match that run)."""
    from translate_baselines import MR_PIXEL_MM, PATCH, translate_study

    study = load_study(Path(__file__).resolve().parents[1] / "sites_example" / "translate-compare.toml")
    three_sites = [Path("a"), Path("b"), Path("c")]
    benchmark = translate_study(argparse.Namespace(rounds=10, local_steps=60, mr_matrix=round(400 / MR_PIXEL_MM),
                                                   patch=PATCH), three_sites)
    assert study.task == benchmark.task and study.run.rounds == benchmark.run.rounds
    assert not study.privacy.enabled and study.run.sites_dir == "benchmarks/data/translate-native"
    # The DP comparison and the public warm start it starts from: the same task and rounds.
    root = Path(__file__).resolve().parents[1] / "sites_example"
    private, public = load_study(root / "translate-compare-dp.toml"), load_study(root / "translate-pretrain.toml")
    assert private.task == public.task == study.task and private.run.rounds == study.run.rounds
    assert private.privacy.enabled and private.privacy.target_epsilon == 8.0
    assert private.run.initial_model == "runs/translate-public.medgan" and not public.privacy.enabled
    assert public.run.sites_dir != study.run.sites_dir  # other phantom subjects than the study's
    # The larger-site DP study: the same task but the learning rates, from the same public start.
    large = load_study(root / "translate-large-dp.toml")
    from medgan_core.tasks.registry import replace_task

    assert replace_task(large.task, lr_generator=study.task.lr_generator,
                        lr_discriminator=study.task.lr_discriminator) == study.task
    assert (large.task.lr_generator, large.task.lr_discriminator) == (5e-5, 5e-5)
    assert large.run.initial_model == private.run.initial_model and large.privacy == private.privacy
    assert large.run.sites_dir == "benchmarks/data/translate-large"
    # Batches of hundreds of slices: the same task at batch 128 in parts of 32, 30 steps a round.
    xl = load_study(root / "translate-xl-dp.toml")
    assert replace_task(xl.task, batch_size=study.task.batch_size, physical_batch=0,
                        local_steps=study.task.local_steps) == study.task
    assert (xl.task.batch_size, xl.task.physical_batch, xl.task.local_steps) == (128, 32, 30)
    assert xl.run.initial_model == private.run.initial_model and xl.privacy == private.privacy
    assert xl.run.sites_dir == "benchmarks/data/translate-xl" and xl.run.rounds == study.run.rounds
    # Every example's sites: MR acquired at the pixels the study trains at, as the benchmark's are.
    for example in sorted(root.glob("translate-*.toml")):
        simulate = [line for line in example.read_text().splitlines() if "medgan sites simulate" in line]
        assert simulate and all(f"--mr-matrix {round(400 / MR_PIXEL_MM)} " in line for line in simulate), example.name


def test_the_translate_benchmark_trains_at_the_mr_matrix_and_patch_it_is_given() -> None:
    """--mr-matrix 384 --patch 128: the study trains at the 1.04 mm MR's own pixels on 128² patches
    (133 mm); the defaults are the recorded 1.56 mm study on 64² patches (100 mm)."""
    from translate_baselines import MR_PIXEL_MM, translate_study

    sites = [Path("a"), Path("b"), Path("c")]
    fine = translate_study(argparse.Namespace(rounds=10, local_steps=60, mr_matrix=384, patch=128), sites).task
    coarse = translate_study(argparse.Namespace(rounds=10, local_steps=60, mr_matrix=256, patch=64), sites).task
    assert (fine.spacing, fine.image_size) == (pytest.approx(400 / 384), 128)
    assert (coarse.spacing, coarse.image_size) == (MR_PIXEL_MM, 64)
    assert fine.name == coarse.name == "translate" and fine.local_steps == 60
    from translate_baselines import patch_side

    assert patch_side("128") == 128
    for bad in ("96", "512", "big"):  # not a power of two from 16 to 256: argparse's one line, exit 2
        with pytest.raises(argparse.ArgumentTypeError, match="image-size|invalid literal"):
            patch_side(bad)
    assert bench_common.mr_matrix_value("384") == 384
    for bad in ("30", "386", "x"):  # the simulator's rule: a multiple of 4, at least 32
        with pytest.raises(argparse.ArgumentTypeError, match="MR matrix|invalid literal"):
            bench_common.mr_matrix_value(bad)


def test_a_benchmark_refuses_sites_whose_mr_is_on_another_matrix(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A --data folder simulated at one MR matrix is not read as another (the recorded recon and
    translate numbers are at 256; the simulator's default is 384): one clear line, no retraining."""
    import json

    def must_not_simulate(*_: object, **__: object) -> None:
        raise AssertionError("simulated over a study that exists")

    data = tmp_path / "data"
    data.mkdir()
    (data / "study.json").write_text(json.dumps({"size": 512, "format": 2, "series": ["mr", "mr-kspace"]}))
    monkeypatch.setattr(bench_common, "simulate_study", must_not_simulate)
    with pytest.raises(SystemExit, match="holds MR at 256×256, this benchmark reads it at 384×384"):
        bench_common.clinical_sites(data, ("mr", "mr-kspace"), 384)
    assert bench_common.clinical_sites(data, ("mr", "mr-kspace"), 256) == []  # a format-2 study: 256
    (data / "study.json").write_text(json.dumps({"size": 512, "format": 2, "mr-matrix": 384}))
    with pytest.raises(SystemExit, match="holds MR at 384×384"):
        bench_common.clinical_sites(data, ("ct", "mr"), 256)
    assert bench_common.clinical_sites(data, ("ct", "ct-low-dose"), 256) == []  # no MR read: any matrix
    from medgan_core.data.simulate import study_mr_matrix

    for size, mr in ((384, 384), (1024, 256), (128, 128)):  # what studies before the key held
        (data / "study.json").write_text(json.dumps({"size": size, "format": 2}))
        assert study_mr_matrix(data) == mr


def test_the_synthesis_warm_start_examples_train_what_the_no_dp_demo_trains() -> None:
    """sites_example/synthesis-pretrain.toml makes the public model that synthesis-warm-dp.toml
    starts from: the no-DP demo's task on other simulated subjects, then the demo's sites at ε = 8."""
    root = Path(__file__).resolve().parents[1] / "sites_example"
    reference, public = load_study(root / "demo-synthesis-no-privacy.toml"), load_study(root / "synthesis-pretrain.toml")
    private = load_study(root / "synthesis-warm-dp.toml")
    from medgan_core.tasks.registry import replace_task

    assert public.task == reference.task == replace_task(private.task, trainable="all", mode_seeking=0.2)
    assert not public.privacy.enabled
    assert public.task.params.mode_seeking == 0.2  # the public model's diversity: 0.52 without the term (results)
    assert private.task.params.trainable == "norms"  # DP noise on every weight undid the start (results)
    assert private.task.params.mode_seeking == 0  # under DP the term lowered precision and FID (results)
    assert private.privacy.enabled and private.privacy.target_epsilon == 8.0
    assert private.run.initial_model == "runs/synthesis-public.medgan" and "synthesis-public" in public.run.sites_dir
    assert private.run.sites_dir == reference.run.sites_dir != public.run.sites_dir


def test_the_synthesis_demo_starts_from_its_shipped_public_model() -> None:
    """demo-synthesis.toml's warm start ships in the repository, fits the demo's networks, and is
    what demo-synthesis-pretrain.toml makes: the demo's task (width 8) with the mode-seeking term, trained
    without DP on the public simulated subjects, not the demo's own sites."""
    from medgan_core.model_file import load_model
    from medgan_core.tasks.registry import build_task, replace_task
    from server.warm_start import initial_weights

    root = Path(__file__).resolve().parents[1]
    demo = load_study(root / "sites_example" / "demo-synthesis.toml")
    public = load_study(root / "sites_example" / "demo-synthesis-pretrain.toml")
    model = load_model(root / demo.run.initial_model)
    assert model.provenance["privacy"]["dp"] is False and model.task == public.task
    assert public.run.sites_dir != demo.run.sites_dir and "synthesis-public" in public.run.sites_dir
    assert replace_task(public.task, mode_seeking=0.0, trainable="norms", lr_generator=demo.task.lr_generator) \
        == replace_task(demo.task, seed=public.task.seed)
    assert demo.task.params.trainable == "norms" and demo.privacy.enabled and demo.privacy.target_epsilon == 8.0
    task = build_task(demo.task)
    task.set_weights(initial_weights(demo), source="demo-synthesis.toml")  # refuses arrays of other networks
    generated = task.sample(16, seed=0)
    assert generated.shape == (16, 1, 64, 64) and torch.isfinite(generated).all()
    # a trained generator, not its initialisation (which draws grey noise around 0, alike):
    # air around a body in half the pixels, and slices that differ from one another
    assert (generated < -0.9).float().mean() > 0.3
    assert generated.flatten(1).std(dim=0).mean() > 0.1


def test_the_default_demo_starts_from_its_shipped_public_denoiser() -> None:
    """demo.toml (denoise at clinical geometry) starts from the model denoise-pretrain.toml makes
    (no DP, the public simulated subjects, not the demo's sites), shipped in the repository, and
    that model already denoises a whole 512×512 phantom slice: the sites refine it under DP."""
    from medgan_core.data.simulate import phantom_ct_pairs
    from medgan_core.metrics.image_quality import ct_scores
    from medgan_core.model_file import load_model
    from medgan_core.tasks.registry import build_task, replace_task
    from server.warm_start import initial_weights

    root = Path(__file__).resolve().parents[1]
    demo = load_study(root / "sites_example" / "demo.toml")
    public = load_study(root / "sites_example" / "denoise-pretrain.toml")
    model = load_model(root / demo.run.initial_model)
    assert model.provenance["privacy"]["dp"] is False and model.task == public.task
    assert not public.privacy.enabled and "denoise-public" in public.run.sites_dir != demo.run.sites_dir
    assert replace_task(demo.task, lr_generator=public.task.lr_generator, lr_discriminator=public.task.lr_discriminator,
                        eval_slices=0, self_ensemble=True, local_steps=public.task.local_steps) == public.task
    assert demo.privacy.enabled and demo.privacy.target_epsilon == 8.0
    task = build_task(demo.task)
    task.set_weights(initial_weights(demo), source="demo.toml")  # refuses arrays of other networks
    low, full = phantom_ct_pairs(1, demo.task, seed=5, clinical=True)
    assert low.shape == (1, 1, 512, 512)
    window = (demo.task.window_low, demo.task.window_high)
    out, noisy = (ct_scores(images, full, task.ct_range, window) for images in (task.restore(low), low))
    assert out["psnr"][0] > noisy["psnr"][0] + 1.5 and out["mae-hu"][0] < 0.8 * noisy["mae-hu"][0]


def test_the_privacy_audit_public_start_trains_the_shipped_model_s_norms_only() -> None:
    """The audit's ``synthesis-public-start`` rows are the synthesis demo's way: the shipped public
    model's weights, then DP training that moves only norms and biases."""
    from medgan_core.data.dataset import SiteData
    from medgan_core.model_file import load_model
    from privacy_audit import STARTS, TASKS, train

    root = Path(__file__).resolve().parents[1]
    start = root / STARTS["synthesis-public-start"]
    public = load_model(start).arrays
    images = torch.rand(40, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = SiteData("audit", images, images[:8], train_subjects=torch.arange(40))
    task, spent, sigma = train(TASKS["synthesis-public-start"], data, 3, epsilon=8.0, start=start)
    trained = task.get_weights()
    assert sigma > 0 and 0 < spent <= 8.0
    moved = {name for name in public if not np.array_equal(public[name], trained[name])}
    assert moved, "DP training moved nothing"
    for name in moved:  # conv weights stay as the public model made them
        assert public[name].ndim == 1, f"{name} is not a norm scale/shift or a bias but moved"
    assert any(public[name].ndim == 4 for name in public)


def test_the_privacy_audit_denoise_public_start_is_the_default_demo_s_way() -> None:
    """The audit's ``denoise-public-start`` rows train what ``medgan demo`` trains: demo.toml's
    task (every held-out slice scored) from the model file demo.toml starts from."""
    from medgan_core.tasks.registry import replace_task
    from privacy_audit import STARTS, TASKS

    root = Path(__file__).resolve().parents[1]
    demo = load_study(root / "sites_example" / "demo.toml")
    assert TASKS["denoise-public-start"] == replace_task(demo.task, eval_slices=0)
    assert STARTS["denoise-public-start"] == Path(demo.run.initial_model)
    assert TASKS["denoise-public-start"].params.trainable == "all" and demo.privacy.enabled


def test_the_privacy_audit_denoise_demo_rows_train_one_demo_site_as_the_demo_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``denoise-demo``: the demo's task and start, for the steps one of its sites takes (its rounds
    and its personal fine-tune, under one ε), on the demo's first site as ``medgan demo`` makes it."""
    from medgan_core.data.simulate import DEFAULT_SITES
    from medgan_core.tasks.registry import replace_task
    import privacy_audit
    from privacy_audit import OWN_STEPS, STARTS, TASKS

    root = Path(__file__).resolve().parents[1]
    demo = load_study(root / "sites_example" / "demo.toml")
    assert TASKS["denoise-demo"] == replace_task(demo.task, eval_slices=0)
    assert STARTS["denoise-demo"] == root / demo.run.initial_model
    assert OWN_STEPS == {"denoise-demo": 4 * 25 + 25} and demo.aggregation.finetune_steps == 25
    made = []
    site = tmp_path / f"site-01-{DEFAULT_SITES[0].name}"
    monkeypatch.setattr(privacy_audit, "simulate_study", lambda out, **kw: made.append(kw) or [site])
    assert privacy_audit.demo_site(tmp_path) == site
    assert made and made[0]["n_sites"] == 1 and made[0]["seed"] == demo.task.seed
    assert (made[0]["n_subjects"], made[0]["n_slices"], made[0]["size"]) == (24, 20, 512)
    assert set(made[0]["series"]) == {"ct", "ct-low-dose"}


def test_the_denoise_and_superres_compare_studies_train_what_their_benchmarks_train(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """sites_example/denoise-compare.toml and superres-compare.toml: the README's comparison
    tables were measured with their benchmark's task settings, sites and fine-tune (denoise on
    half the benchmark's rounds and a third of its fine-tune, as the file says)."""
    import types

    monkeypatch.setitem(sys.modules, "bm3d", types.ModuleType("bm3d"))  # a bench extra; only its constants are read
    monkeypatch.delitem(sys.modules, "denoise_baselines", raising=False)
    import denoise_baselines as denoise
    import superres_baselines as superres

    monkeypatch.delitem(sys.modules, "denoise_baselines")  # not kept with the stand-in bm3d

    root = Path(__file__).resolve().parents[1] / "sites_example"
    three_sites = [Path("a"), Path("b"), Path("c")]
    study = load_study(root / "denoise-compare.toml")
    benchmark = bench_common.paired_study(argparse.Namespace(rounds=denoise.ROUNDS // 2, local_steps=denoise.LOCAL_STEPS),
                                          three_sites, name="denoise", image_size=denoise.PATCH, spacing=0.0,
                                          width=denoise.WIDTH, batch_size=denoise.BATCH, l1_weight=denoise.L1_WEIGHT,
                                          lr_generator=denoise.LR, lr_discriminator=denoise.LR)
    assert study.task == benchmark.task and study.run.rounds == benchmark.run.rounds
    assert study.aggregation.local_norm and study.aggregation.finetune_steps == denoise.FINETUNE_STEPS // 3
    assert study.aggregation.finetune_validate_every == 100 and not study.privacy.enabled
    assert study.run.sites_dir == "benchmarks/data/denoise-native"
    study = load_study(root / "superres-compare.toml")
    benchmark = bench_common.paired_study(argparse.Namespace(rounds=5, local_steps=60), three_sites,
                                          name="superres", scale=4, spacing=0.0)
    assert study.task == benchmark.task and study.run.rounds == benchmark.run.rounds
    assert (study.aggregation.finetune_steps, study.aggregation.finetune_validate_every) == (
        superres.FINETUNE_STEPS, 100)
    assert not study.privacy.enabled and study.run.sites_dir == "benchmarks/data/superres-native"


@pytest.mark.parametrize("task", ["denoise", "superres"])
def test_a_dp_compare_study_is_the_plain_one_under_dp_at_a_quarter_of_its_rates(task: str) -> None:
    """sites_example/{denoise,superres}-compare-dp.toml: the README's DP tables (91 % and 87 %
    of the non-DP gain) were measured on the plain comparison study with DP at ε = 8, the
    public warm start and a quarter of its learning rates; nothing else may differ."""
    root = Path(__file__).resolve().parents[1] / "sites_example"
    plain, private = load_study(root / f"{task}-compare.toml"), load_study(root / f"{task}-compare-dp.toml")
    assert private.privacy.enabled and (private.privacy.target_epsilon, private.privacy.delta) == (8.0, 1e-5)
    assert private.run.initial_model == f"runs/{task}-public.medgan"
    assert (private.task.lr_generator, private.task.lr_discriminator) == (
        plain.task.lr_generator / 4, plain.task.lr_discriminator / 4)
    assert private.replace(task={"lr_generator": plain.task.lr_generator,
                                 "lr_discriminator": plain.task.lr_discriminator}).task == plain.task
    assert private.aggregation == plain.aggregation
    assert private.replace(run={"initial_model": "", "out_dir": plain.run.out_dir}).run == plain.run


def test_the_small_site_denoise_study_is_the_denoise_comparison_on_other_sites() -> None:
    """sites_example/denoise-small-site-compare.toml: the README's small-site table was measured
    on the denoise comparison's study with only its sites (hospital A cut to one subject) moved."""
    root = Path(__file__).resolve().parents[1] / "sites_example"
    plain, small = load_study(root / "denoise-compare.toml"), load_study(root / "denoise-small-site-compare.toml")
    assert small.run.sites_dir == "benchmarks/data/denoise-small-a"
    assert small.replace(run={"sites_dir": plain.run.sites_dir, "out_dir": plain.run.out_dir}) == plain


def test_the_recon_benchmark_runs_the_accelerations_asked_for() -> None:
    """--accelerations picks studies of the two the benchmark tunes (each about an hour on 2 cores)."""
    from recon_baselines import TV_START, acceleration_option

    parser = argparse.ArgumentParser()
    acceleration_option(parser)
    assert parser.parse_args([]).accelerations == tuple(TV_START) == (4, 10)
    assert parser.parse_args(["--accelerations", "4"]).accelerations == (4,)
    for bad in ("5", "4,x", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--accelerations", bad])


def test_demo_results_reads_a_run_folder_and_crops_whole_rows_of_its_grid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/demo_results.py: the scores of every evaluated round and each site's last, the
    largest ε spent, and the grid's first rows cut at a row's border (thumbnails drawn 2×)."""
    import json
    import sys

    from PIL import Image

    import demo_results
    from demo_results import first_rows
    from medgan_core.study_config import dump_study
    from server.samples import save_grid

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text(dump_study(load_study(root / "sites_example" / "demo.toml")))
    scores = {"psnr": 45.0, "psnr-input": 43.0, "mae-hu": 29.0, "mae-hu-input": 46.0}
    site = {"site": "site-01-hospital-a", "train": {"epsilon": 5.3125}, "evaluate": {**scores, "psnr": 47.25}}
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "evaluate": scores, "sites": []}) + "\n"
                                       + json.dumps({"round": 1, "evaluate": {**scores, "psnr": 46.5},
                                                     "sites": [site]}) + "\n{\"round\": 2, \"eva")  # torn by a crash
    slices = torch.linspace(-1, 1, 4 * 3 * 64 * 64).reshape(12, 1, 64, 64)  # 4 rows of 3, drawn 2× (under 256)
    save_grid(slices, run / "samples" / "round-001.png", columns=3)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["demo_results.py", str(run), "--out", str(out), "--command", "make demo"])
    demo_results.main()
    text = (out / "results.md").read_text()
    assert "| 0 | 45.000 | 29.000 | 43.000 | 46.000 | — |" in text
    assert "| 1 | 46.500 | 29.000 | 43.000 | 46.000 | 5.31 |" in text
    assert "| site-01-hospital-a | 47.250 | 29.000 | 43.000 | 46.000 |" in text and "DP on at ε = 8" in text
    assert Image.open(out / "last-round.png").size == (2 * (3 * 66 + 2), 2 * (66 + 2))  # the first row, whole
    assert "fine-tuned" not in text  # round 1 of 4: no site has fine-tuned yet
    (run / "metrics.jsonl").write_text(json.dumps({"round": 4, "evaluate": scores, "sites": [site]}) + "\n")
    (run / "samples" / "round-001.png").rename(run / "samples" / "round-004.png")
    demo_results.main()
    text = (out / "results.md").read_text()  # demo.toml fine-tunes 25 steps after its last round
    assert "By site after round 4 (each site's own model: the federated one fine-tuned 25 steps" in text
    assert "with the federated model (the sites' fine-tuned models never leave them)" in text

    images = torch.linspace(-1, 1, 12 * 32 * 32).reshape(12, 1, 32, 32)  # 4 rows of 3, drawn 2× (under 256)
    save_grid(images, run / "grid.png", columns=3)
    grid = Image.open(run / "grid.png")
    assert grid.size == (2 * (3 * 34 + 2), 2 * (4 * 34 + 2))
    assert first_rows(grid, 3, 1).size == (grid.size[0], 2 * (34 + 2))
    assert first_rows(grid, 3, 9).size == grid.size  # no more rows than the grid has
    with pytest.raises(ValueError, match="not a grid"):
        first_rows(grid, 5, 1)
    save_grid(torch.zeros(6, 1, 256, 256), run / "clinical.png", columns=3)  # drawn as they are
    assert first_rows(Image.open(run / "clinical.png"), 3, 1).size == (3 * 258 + 2, 258 + 2)
