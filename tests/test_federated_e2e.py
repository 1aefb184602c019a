"""A real federated run in Flower's simulation engine: 2 sites x 2 rounds on tiny images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from medgan_core.config import StudyConfig
from medgan_core.fileio import read_jsonl
from medgan_core.tasks import build_task
from server.checkpoints import load_checkpoint
from server.simulation import simulate_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federated_run(tiny_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    study = StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu"},
        task={"image_size": 16, "batch_size": 8, "local_steps": 3, "width": 8, "z_dim": 8, "eval_samples": 16},
    )
    run_dir = tmp_path_factory.mktemp("run")
    received: dict[int, list[Message]] = {}
    summaries = []
    simulate_federation(
        study, tiny_sites, run_dir, progress=summaries.append,
        on_train_replies=lambda rnd, replies: received.__setitem__(rnd, replies),
    )
    return {"study": study, "run_dir": run_dir, "received": received, "summaries": summaries}


def _client_update(msg: Message) -> tuple[dict[str, np.ndarray], float]:
    record = msg.content["arrays"]
    return {k: v.numpy() for k, v in record.items()}, float(msg.content["metrics"]["num-examples"])


def test_run_folder_has_every_output(federated_run: dict) -> None:
    run_dir: Path = federated_run["run_dir"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert (run_dir / record["checkpoint"]).is_file()
        assert (run_dir / record["samples"]).is_file()
        assert len(record["sites"]) == 2 and not record["excluded"]
        assert np.isfinite(record["evaluate"]["swd"])
    assert {"loss-d", "loss-g"} <= set(records[1]["train"])
    assert (run_dir / "config.toml").is_file()
    report = (run_dir / "report.md").read_text()
    assert "| 2 | 2 |" in report and "samples/round-002.png" in report
    assert [s.server_round for s in federated_run["summaries"]] == [0, 1, 2]


def test_clients_send_only_named_weight_arrays_and_scalars(federated_run: dict) -> None:
    expected = build_task(federated_run["study"].task).weight_shapes()
    for replies in federated_run["received"].values():
        assert len(replies) == 2
        for msg in replies:
            content = msg.content
            assert not msg.has_error()
            assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
            assert len(content.config_records) == 0
            arrays = {k: v.numpy() for k, v in content["arrays"].items()}
            assert {k: v.shape for k, v in arrays.items()} == expected
            for value in content["metrics"].values():
                assert isinstance(value, (int, float)) and not isinstance(value, bool)


def test_aggregate_is_the_sample_weighted_mean_of_client_updates(federated_run: dict) -> None:
    run_dir: Path = federated_run["run_dir"]
    for rnd, replies in federated_run["received"].items():
        updates = [_client_update(m) for m in replies]
        weights = [w for _, w in updates]
        assert len(set(weights)) == 2, "sites must differ in size for this check to mean anything"
        aggregate, meta = load_checkpoint(run_dir / "checkpoints" / f"round-{rnd:03d}.safetensors")
        assert meta["round"] == rnd
        assert set(aggregate) == set(updates[0][0])
        for name, value in aggregate.items():
            expected = sum(u[name] * w for u, w in updates) / sum(weights)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
        # The sites trained on different data, so the mean is not trivially either update.
        differing = [k for k in aggregate if not np.allclose(updates[0][0][k], updates[1][0][k])]
        assert len(differing) == len(aggregate)


def test_weights_changed_in_every_group_and_checkpoint_loads_back(federated_run: dict) -> None:
    run_dir: Path = federated_run["run_dir"]
    initial, _ = load_checkpoint(run_dir / "checkpoints" / "round-000.safetensors")
    final, meta = load_checkpoint(run_dir / "checkpoints" / "round-002.safetensors")
    for group in ("generator", "discriminator"):
        assert any(not np.array_equal(initial[k], final[k]) for k in initial if k.startswith(group))
    task = build_task(federated_run["study"].task)
    assert not all(np.array_equal(task.get_weights()[k], final[k]) for k in final)
    task.set_weights(final)
    assert all(np.array_equal(task.get_weights()[k], final[k]) for k in final)
    assert task.preview(4).shape == (4, 1, 16, 16)
    assert meta["study"]["task"]["image-size"] == 16


def test_same_seed_same_global_model(federated_run: dict, tiny_sites: list[Path], tmp_path: Path) -> None:
    """Node ids and reply order are random in Flower; the result must not depend on them."""
    simulate_federation(federated_run["study"], tiny_sites, tmp_path / "again")
    first, _ = load_checkpoint(federated_run["run_dir"] / "checkpoints" / "round-002.safetensors")
    second, _ = load_checkpoint(tmp_path / "again" / "checkpoints" / "round-002.safetensors")
    for name, value in first.items():
        np.testing.assert_array_equal(value, second[name])
