from pathlib import Path

import pytest

from medgan_core.round_instructions import RoundInstructions
from medgan_core.study_config import StudyConfig, dump_study, load_study
from medgan_core.errors import ConfigError
from medgan_core.tasks.registry import SHARED_KEYS, task_names

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_round_trips(tmp_path: Path) -> None:
    study = load_study(ROOT / "sites_example" / "demo.toml")
    assert study.run.num_sites == 3 and study.task.name == "denoise" and study.privacy.enabled
    assert study.task.spacing == 0.0 and study.task.params.eval_slices == 4 and not study.task.params.self_ensemble
    copy = tmp_path / "copy.toml"
    copy.write_text(dump_study(study))
    assert load_study(copy) == study
    assert StudyConfig.from_flat(study.to_flat()) == study


def test_no_privacy_synthesis_demo_config_differs_only_where_it_says() -> None:
    private = load_study(ROOT / "sites_example" / "demo-synthesis.toml")
    plain = load_study(ROOT / "sites_example" / "demo-synthesis-no-privacy.toml")
    assert private.privacy.enabled and not plain.privacy.enabled
    assert plain.task.width == 32 and plain.run.out_dir != private.run.out_dir
    assert plain.run.sites_dir == private.run.sites_dir and plain.task.local_steps == private.task.local_steps


def test_pyproject_flower_config_is_a_valid_study() -> None:
    import tomllib

    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    study = StudyConfig.from_dict(raw, "pyproject.toml")
    assert study.task.name == "synthesis"
    # `flwr run --run-config` can only override keys that exist there: every shared key must,
    # and no task's own key may (it would be refused when another task is named).
    # A task's own keys travel folded into task.params (Flower refuses keys pyproject lacks).
    shared = {k for k in StudyConfig().to_flat() if not k.startswith("task.")} | {f"task.{k}" for k in SHARED_KEYS}
    assert {f"{t}.{k}" for t, keys in raw.items() for k in keys} == shared | {"task.params"}
    for name in task_names():
        modality = "MR" if name == "recon" else "CT"
        assert StudyConfig.from_dict({**raw, "task": {**raw["task"], "name": name, "modality": modality}}).task.name == name


def test_a_tasks_own_keys_fold_into_task_params_for_flowers_run_config() -> None:
    study = StudyConfig().replace(task={"name": "cycle", "cycle_pool": 2, "tv_weight": 2.0})
    tables = study.to_run_config()
    assert tables["task"]["params"] == ('ema = 0.0, trainable = "all", adam-beta1 = 0.5, eval-slices = 0, identity-weight = 5.0, '
                                        'cycle-pool = 2, tv-weight = 2.0, histogram-start = false')
    assert StudyConfig.from_dict(tables) == study
    assert "cycle-pool" not in tables["task"] and study.to_flat()["task.cycle-pool"] == 2
    with pytest.raises(ConfigError, match="task.cycle-pool is given both directly and in task.params"):
        StudyConfig.from_dict({"task": {**tables["task"], "cycle-pool": 4}})
    with pytest.raises(ConfigError, match="is not 'KEY = VALUE, …' in TOML"):
        StudyConfig.from_dict({"task": {"name": "cycle", "params": "cycle-pool 2"}})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[run]\nround = 3\n", "unknown key run.round"),
        ("[run]\nrounds = 'five'\n", "run.rounds = 'five' has type str; expected int"),
        ("[task]\nname = 'nope'\n", "task.name = 'nope' is not a known task"),
        ("[task]\nimage-size = 48\n", "power of two"),
        ("[task]\nmodality = 'PET'\n", "choose one of CT, MR"),
        ("[task]\nwindow-low = 100.0\nwindow-high = 0.0\n", "task.window-high"),
        ("[run]\ndevice = 'tpu'\n", "run.device = 'tpu'"),
        ("[task]\nname = 'denoise'\nl1-weight = 0.0\n", "task.l1-weight = 0.0; it must be a positive number"),
        ("[task]\nname = 'denoise'\nssim-weight = -1.0\n", "task.ssim-weight = -1.0; it must be 0 (off) or a positive number"),
        ("[task]\nname = 'cycle'\nssim-weight = 10.0\n", "task 'cycle' has no key task.ssim-weight (a key of task 'denoise'"),
        ("[task]\nssim-weight = 10.0\n", "task 'synthesis' has no key task.ssim-weight"),
        ("[task]\nname = 'cycle'\nidentity-weight = -1.0\n", "task.identity-weight = -1.0; it must be 0 (off)"),
        ("[task]\nname = 'denoise'\ncycle-pool = 2\n", "task 'denoise' has no key task.cycle-pool (a key of task 'cycle')"),
        ("[task]\nname = 'cycle'\ncrop-size = 32\n", "task.crop-size is no longer a key of task 'cycle': cycle now trains "
         "on task.image-size patches"),
        ("[task]\nname = 'cycle'\nalpha = 1\ncrop-size = 32\n", "task.crop-size is no longer a key of task 'cycle'"),
        ("[task]\nname = 'cycle'\ncycle-pool = 3\n", "task.cycle-pool = 3; choose one of 1, 2, 4"),
        ("[task]\nname = 'cycle'\ntv-weight = -0.5\n", "task.tv-weight = -0.5; it must be 0 (off)"),
        ("[task]\nname = 'denoise'\ntv-weight = 1.0\n", "task 'denoise' has no key task.tv-weight"),
        ("[task]\nname = 'translate'\ncycle-pool = 2\n", "task 'translate' has no key task.cycle-pool"),
        ("[runs]\n", "unknown table"),
        ("[run\n", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_allowed_values(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_study(path)
    assert fragment in str(info.value)


def test_ssim_weight_is_accepted_by_every_task_that_reads_it() -> None:
    for name in ("translate", "denoise", "superres", "recon"):
        modality = "MR" if name == "recon" else "CT"
        assert StudyConfig().replace(task={"name": name, "modality": modality, "ssim_weight": 5.0}).task.params.ssim_weight == 5.0


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "nope.toml")


def test_round_instructions_need_every_key_of_the_task_the_coordinator_names() -> None:
    study = StudyConfig().replace(task={"name": "superres", "scale": 4})
    flat = {**RoundInstructions.for_study(study, "s1"), "server-round": 3}
    assert RoundInstructions.from_flat(flat).task.params == study.task.params
    with pytest.raises(ConfigError, match="lack task.scale"):
        RoundInstructions.from_flat({k: v for k, v in flat.items() if k != "task.scale"})
    with pytest.raises(ConfigError, match="task 'superres' has no key task.z-dim"):
        RoundInstructions.from_flat({**flat, "task.z-dim": 8})


@pytest.mark.parametrize("path", sorted((ROOT / "sites_example").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_study_loads(path: Path) -> None:
    study = load_study(path)
    assert StudyConfig.from_flat(study.to_flat()) == study
