"""A real federated run in Flower's simulation engine: 2 sites x 2 rounds on tiny images
(conftest's ``federated_run``, which the network-security tests read too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from medgan_core.study_config import StudyConfig
from medgan_core.fileio import read_jsonl
from medgan_core.tasks.registry import build_task
from medgan_core.checkpoints import load_checkpoint
import medgan.simulation as simulation
from medgan.simulation import cpu_share, simulate_federation

pytestmark = pytest.mark.slow


def test_each_site_is_watched_as_its_reply_arrives(federated_run: dict) -> None:
    """The live display's input: every site goes working -> done in every phase of every round."""
    records = read_jsonl(federated_run["run_dir"] / "metrics.jsonl")
    nodes = {site["node"] for site in records[1]["sites"]}
    events = federated_run["events"]
    for server_round, phase in ((0, "evaluate"), (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")):
        seen = [(e.node, e.state) for e in events if (e.server_round, e.phase) == (server_round, phase)]
        assert sorted(seen) == sorted([(n, "working") for n in nodes] + [(n, "done") for n in nodes]), seen
        for node in nodes:  # working before done
            assert seen.index((node, "working")) < seen.index((node, "done"))


def test_tensorboard_tracking_holds_every_round(federated_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir: Path = federated_run["run_dir"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    swd = events.Scalars("evaluate/swd")
    assert [e.step for e in swd] == [0, 1, 2]
    assert [e.value for e in swd] == pytest.approx([r["evaluate"]["swd"] for r in records], rel=1e-6)
    epsilon = events.Scalars("train/epsilon")
    assert [e.step for e in epsilon] == [1, 2]
    assert [e.value for e in epsilon] == pytest.approx([r["train"]["epsilon"] for r in records[1:]], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("sites/answered")] == [2, 2, 2]


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
        assert sorted(site["site"] for site in record["sites"]) == ["site-a", "site-c"]  # named as they announced
        assert np.isfinite(record["evaluate"]["swd"])
    # under DP a site sends the mechanism's bookkeeping only: no loss computed from its images
    assert "epsilon" in records[1]["train"] and not {"loss-d", "loss-g"} & set(records[1]["train"])
    for site in records[2]["sites"]:  # DP is on by default: every site reports what it spent
        assert 0 < site["train"]["epsilon"] <= site["train"]["epsilon-budget"] == 8.0
        assert site["train"]["dp-steps"] == 6
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
            # the one text: the site's name, a short label
            assert {k: dict(v) for k, v in content.config_records.items()} in (
                {"site": {"name": "site-a"}}, {"site": {"name": "site-c"}})
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


def test_privacy_report_lists_every_site_and_round(federated_run: dict) -> None:
    from server.privacy_report import privacy_report
    from server.run_folder import RunFolder

    text = privacy_report(RunFolder(federated_run["run_dir"]))
    assert text.count("| 1 | ") == 2 and text.count("| 2 | ") == 2
    assert "δ = 1e-05" in text and "seeded (testing only" in text
    assert (federated_run["run_dir"] / "privacy-report.md").is_file()


def test_a_site_out_of_budget_is_left_out_and_the_federation_goes_on(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    from opacus.accountants import RDPAccountant

    from medgan_core.config import SiteConfig
    from medgan_core.data.dataset import load_site_data

    study = StudyConfig().replace(
        run={"rounds": 3, "num_sites": 2, "device": "cpu"},
        task={"image_size": 16, "batch_size": 8, "local_steps": 3, "width": 8, "z_dim": 8, "eval_samples": 16},
        privacy={"noise_multiplier": 1.0, "target_epsilon": 1000.0},
    )
    small = tiny_sites[0]
    q = 8 / load_site_data(small, study.task).num_train
    reference = RDPAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.0, sample_rate=q)
    one_round = reference.get_epsilon(delta=1e-5)
    sites = [
        SiteConfig(str(small), name="hospital-a", state_dir=str(tmp_path / "state-a"), epsilon_budget=one_round * 1.01),
        SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path / "state-b")),
    ]
    received: dict[int, list[Message]] = {}
    simulate_federation(study, sites, tmp_path / "run",
                        on_train_replies=lambda rnd, replies: received.__setitem__(rnd, replies))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [len(r["excluded"]) for r in records] == [0, 0, 1, 1]
    assert "privacy budget reached" in records[2]["excluded"][0]["reason"]
    # the coordinator names the site that stopped, from its replies: in round 1, and in the
    # failed replies' reasons (where the name is taken off the head of the reason)
    assert [e.get("site") for r in records[2:] for e in r["excluded"]] == ["hospital-a", "hospital-a"]
    assert not records[2]["excluded"][0]["reason"].startswith("site error: [")
    # Rounds 2 and 3 aggregate the other site alone: the global model is exactly its update.
    ok = [m for m in received[2] if not m.has_error()]
    assert len(ok) == 1
    final, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-002.safetensors")
    for name, value in ok[0].content["arrays"].items():
        np.testing.assert_allclose(final[name], value.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cpus", "sites", "share"), [(2, 2, 1.0), (16, 3, 1.0), (2, 3, 0.6666), (2, 10, 0.5)])
def test_every_site_gets_a_cpu_share_so_all_train_at_once(cpus: int, sites: int, share: float) -> None:
    got = cpu_share(cpus, sites)
    assert got == share
    # Flower sizes its actor pool as int(cpus / share); Ray must fit that many shares.
    actors = int(cpus / got)
    assert min(actors, sites) == min(sites, 2 * cpus) and actors * got <= cpus


def test_the_simulation_engine_is_given_that_share(tiny_sites: list[Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(simulation, "run_simulation", lambda **kwargs: seen.update(kwargs))
    study = StudyConfig().replace(run={"rounds": 1, "num_sites": 2, "device": "cpu"})
    simulation.simulate_federation(study, tiny_sites, tmp_path / "run")
    assert seen["backend_config"]["client_resources"]["num_cpus"] == 0.5  # 2 sites on 1 core: both at once
    assert seen["backend_config"]["init_args"]["num_cpus"] == 1


@pytest.mark.slow
def test_evaluate_every_skips_the_held_out_evaluation_and_grid_between(tiny_sites: list[Path], tmp_path: Path,
                                                                      tiny_study: StudyConfig) -> None:
    study = tiny_study.replace(run={"rounds": 4, "evaluate_every": 3}, task={"local_steps": 1},
                               privacy={"enabled": False})
    simulate_federation(study, tiny_sites, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evaluated = [r["round"] for r in records if r["evaluate"]]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4] and evaluated == [0, 1, 3, 4]
    assert "samples" not in records[2] and not (tmp_path / "run" / "samples" / "round-002.png").exists()
    assert all((tmp_path / "run" / r["samples"]).is_file() for r in records if r["round"] in evaluated)
    assert (tmp_path / "run" / records[2]["checkpoint"]).is_file()  # every round is still checkpointed
    assert "samples/round-004.png" in (tmp_path / "run" / "report.md").read_text()
