"""Server momentum (FedAvgM): the coordinator steps along a running sum of the rounds'
averaged updates, carries it across a restart, and refuses settings it cannot honour."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medgan_core.checkpoints import load_checkpoint
from medgan_core.errors import ConfigError, WeightsError
from medgan_core.study_config import StudyConfig
from server.run_folder import RunFolder
from server.study import run_study
from strategies.grouped_fedavg import GroupedFedAvg, GroupedFedAvgM, build_strategy

from client_messages import message_metadata


pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ShiftingSites:
    """A grid of fake sites: each returns the model it was sent plus its own ``shift`` (so
    every round's sample-weighted average moves every weight by the same known amount)."""

    def __init__(self, shifts: dict[int, float]) -> None:
        self.shifts = shifts

    def get_node_ids(self) -> list[int]:
        return list(self.shifts)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, metadata=message_metadata(0, dst_node_id, message_type))

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return [self._reply(m) for m in messages]

    def _reply(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        metrics = MetricRecord({"num-examples": 10.0})
        if message.metadata.message_type.startswith("train"):
            sent = message.content["arrays"]
            arrays = ArrayRecord({k: Array((v.numpy() + self.shifts[node]).astype(np.float32)) for k, v in sent.items()})
            content = RecordDict({"arrays": arrays, "metrics": metrics})
        else:
            content = RecordDict({"metrics": metrics})
        reply = Message(content, metadata=message_metadata(node, 0, message.metadata.message_type))
        return reply


def _study(rounds: int, out: Path, momentum: float = 0.5, resume: bool = False) -> StudyConfig:
    return StudyConfig().replace(
        run={"rounds": rounds, "num_sites": 2, "device": "cpu", "out_dir": str(out), "round_timeout": 5.0,
             "evaluate_every": 100, "resume": resume},
        task={"image_size": 16, "batch_size": 4, "local_steps": 1, "width": 8, "z_dim": 8, "eval_samples": 8},
        aggregation={"server_momentum": momentum},
    )


def test_each_round_moves_by_the_momentum_sum_and_a_restart_keeps_it(tmp_path: Path) -> None:
    """Sites that shift every weight by +0.01 and +0.03 average to +0.02 a round; with β = 0.5
    round r moves by 0.02·(1 + β + … + β^(r-1)). A coordinator restarted after round 2 ends
    where the uninterrupted one does: the momentum travels with the checkpoint."""
    beta, step = 0.5, 0.02
    whole = RunFolder(tmp_path / "whole")
    run_study(ShiftingSites({1: 0.01, 2: 0.03}), _study(3, whole.root, beta), whole)  # type: ignore[arg-type]
    weights = [load_checkpoint(whole.checkpoint(r))[0] for r in range(4)]
    for r in range(1, 4):
        moved = step * sum(beta**k for k in range(r))
        for name, before in weights[r - 1].items():
            np.testing.assert_allclose(weights[r][name], before + moved, atol=2e-6, err_msg=f"round {r}: {name}")
            assert weights[r][name].dtype == np.float32
    momentum = load_checkpoint(whole.server_optimizer(3))[0]
    assert set(momentum) == {f"momentum:{name}" for name in weights[0]}
    assert all(np.allclose(m, -step * (1 + beta + beta**2), atol=1e-6) for m in momentum.values())

    split = RunFolder(tmp_path / "split")
    run_study(ShiftingSites({1: 0.01, 2: 0.03}), _study(2, split.root, beta), split)  # type: ignore[arg-type]
    run_study(ShiftingSites({1: 0.01, 2: 0.03}), _study(3, split.root, beta, resume=True), split)  # type: ignore[arg-type]
    resumed = load_checkpoint(split.checkpoint(3))[0]
    for name, value in weights[3].items():
        np.testing.assert_allclose(resumed[name], value, atol=2e-6)
    assert "server momentum β = 0.5 (FedAvgM)" in (split.root / "report.md").read_text()


def test_plain_averaging_is_fedavgm_only_with_momentum() -> None:
    shapes = {"generator.w": (2,)}
    assert type(build_strategy("fedavg", ["generator"], shapes)) is GroupedFedAvg
    strategy = build_strategy("fedavg", ["generator"], shapes, server_momentum=0.9)
    assert isinstance(strategy, GroupedFedAvgM) and strategy.server_momentum == 0.9
    assert strategy.server_learning_rate == 1.0 and strategy.expected_shapes == shapes
    with pytest.raises(WeightsError, match="other moments"):  # a FedAdam run's moments
        strategy.load_optimizer_state({"m:generator.w": np.ones(2, np.float32)})


def test_a_saved_momentum_for_another_model_is_refused() -> None:
    strategy = build_strategy("fedavg", ["generator"], {"generator.w": (2,)}, server_momentum=0.9,
                              fedavg_kwargs={"min_available_nodes": 1, "min_train_nodes": 1})
    strategy.set_node_waits(1.0, 1.0)
    for saved in ({"momentum:generator.v": np.ones(2, np.float32)}, {"momentum:generator.w": np.ones(3, np.float32)}):
        strategy.load_optimizer_state(saved)
        strategy.current_arrays = None  # a fresh coordinator, as on resume
        with pytest.raises(WeightsError, match="lacks or misshapes"):
            strategy.configure_train(1, ArrayRecord({"generator.w": Array(np.zeros(2, np.float32))}), ConfigRecord({}),
                                     ShiftingSites({1: 0.0}))  # type: ignore[arg-type]


@pytest.mark.parametrize("aggregation, message", [
    ({"server_momentum": 1.0}, "server-momentum = 1.0; it must lie in [0, 1)"),
    ({"server_momentum": -0.1}, "server-momentum = -0.1"),
    ({"server_momentum": 0.9, "server_optimizer": "fedadam"}, "own first moment"),
])
def test_bad_momentum_settings_are_refused_by_key(aggregation: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        StudyConfig().replace(aggregation=aggregation).validate()


def test_secure_aggregation_refuses_server_momentum() -> None:
    with pytest.raises(ConfigError, match="plain averaging only"):
        StudyConfig().replace(privacy={"secagg": True}, aggregation={"server_momentum": 0.5}).validate()
