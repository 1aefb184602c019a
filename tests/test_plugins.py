"""A task and an aggregation policy written outside the package, each in one file
(tests/plugins/), each registered with one line: an entry point of a package's metadata."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from medgan_core.errors import ConfigError
from medgan_core.fileio import read_jsonl
from medgan_core.policies.registry import policy_names
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, task_names
from medgan_core.checkpoints import load_checkpoint

PLUGINS = Path(__file__).resolve().parent / "plugins"
#: The whole registration of both: what a plugin package's entry_points.txt holds.
ENTRY_POINTS = """\
[medgan.tasks]
toy = toy_task:ToyTask

[medgan.policies]
equal-mean = equal_mean:EqualMean
"""


@pytest.fixture()
def installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if a package holding tests/plugins were installed: its metadata and its modules on
    the path here and, through PYTHONPATH, in the simulation's worker processes."""
    dist = tmp_path / "medgan_toy_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: medgan-toy-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    for path in (str(tmp_path), str(PLUGINS)):
        monkeypatch.syspath_prepend(path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(PLUGINS), os.environ.get("PYTHONPATH", "")]))


def _toy_study() -> StudyConfig:
    return StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu"},
        task={"name": "toy", "hidden": 4, "image_size": 16, "batch_size": 8, "local_steps": 3},
        aggregation={"policy": "equal-mean"},
        privacy={"secure_rng": False},
    )


def test_unregistered_they_are_unknown() -> None:
    assert "toy" not in task_names() and "equal-mean" not in policy_names()
    with pytest.raises(ConfigError, match="'toy' is not a known task"):
        StudyConfig.from_dict({"task": {"name": "toy"}})


def test_registered_they_are_known_and_own_their_keys(installed_plugins: None) -> None:
    assert "toy" in task_names() and "equal-mean" in policy_names()
    study = _toy_study()
    assert study.task.params.hidden == 4  # type: ignore[attr-defined]
    assert StudyConfig.from_flat(study.to_flat()) == study
    with pytest.raises(ConfigError, match=r"task.hidden = 0; it must lie in \[1, 256\]"):
        study.replace(task={"hidden": 0})
    with pytest.raises(ConfigError, match="task 'denoise' has no key task.hidden \\(a key of task 'toy'\\)"):
        StudyConfig.from_dict({"task": {"name": "denoise", "hidden": 4}})
    # a policy that is a mean of the updates may run under secure aggregation; the report names it
    assert study.replace(privacy={"secagg": True}).privacy.secagg
    from server.report import aggregation_line

    assert "unweighted mean (every site counts once)" in aggregation_line(study)


@pytest.mark.slow
def test_a_registered_task_and_policy_run_federated(installed_plugins: None, tiny_sites: list[Path],
                                                    tmp_path: Path) -> None:
    from medgan.simulation import simulate_federation

    study = _toy_study()
    received: dict[int, list[Message]] = {}
    run_dir = simulate_federation(study, tiny_sites, tmp_path / "run",
                                  on_train_replies=lambda rnd, replies: received.__setitem__(rnd, replies))
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2] and not any(r["excluded"] for r in records)
    assert all(np.isfinite(r["evaluate"]["mean-gap"]) for r in records)  # the toy's own headline metric
    assert records[2]["sites"][0]["train"]["dp-steps"] == 6  # DP-SGD through the one private path
    shapes = build_task(study.task).weight_shapes()
    assert shapes["generator.0.weight"] == (4, 8)  # task.hidden reached every site
    for rnd, replies in received.items():
        updates = [{k: v.numpy() for k, v in m.content["arrays"].items()} for m in replies]
        sizes = [float(m.content["metrics"]["num-examples"]) for m in replies]
        assert len(updates) == 2 and sizes[0] != sizes[1]  # a weighted mean would differ
        aggregate, _ = load_checkpoint(run_dir / "checkpoints" / f"round-{rnd:03d}.safetensors")
        assert {k: v.shape for k, v in aggregate.items()} == shapes
        for name, value in aggregate.items():  # the registered policy combined them: each site counts once
            np.testing.assert_allclose(value, (updates[0][name] + updates[1][name]) / 2, rtol=1e-5, atol=1e-6)
    assert sys.modules["toy_task"].ToyTask is type(build_task(study.task))


def test_a_bad_registration_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "bad_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[medgan.tasks]\nfake = equal_mean:EqualMean\nlost = nowhere:Task\n")
    for path in (str(tmp_path), str(PLUGINS)):
        monkeypatch.syspath_prepend(path)
    with pytest.raises(ConfigError, match="registered as equal_mean:EqualMean, which is not a Task named 'fake'"):
        StudyConfig.from_dict({"task": {"name": "fake"}})
    with pytest.raises(ConfigError, match="registered as nowhere:Task, which cannot be loaded"):
        StudyConfig.from_dict({"task": {"name": "lost"}})
    (dist / "entry_points.txt").write_text("[medgan.policies]\nmedian = equal_mean:EqualMean\n")
    monkeypatch.syspath_prepend(str(tmp_path / "again"))  # a new path: the registry looks again
    with pytest.raises(ConfigError, match="registers aggregation policy 'median', a built-in name"):
        policy_names()
