"""Nothing stalls and nothing fails silently (issue 19, points 12 and 14).

A lost site must not stall a study: every wait for sites is bounded, the round is still
recorded and the exclusion names the lost site once. A study in which no site ever
sent a usable update ends with a non-zero exit and one line, not a quiet success.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata

from medgan_core.study_config import StudyConfig
from server.run_folder import RunFolder
from server.study import StudyFailed, run_study
from strategies.grouped_fedavg import GroupedFedAvg

from client_messages import message_metadata

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("flower_task_identity")]


def _error_from(node: int, kind: str, reason: str) -> Message:
    return Message(Error(code=4030, reason=reason), metadata=message_metadata(node, 0, kind, f"{node}-0"))


class FakeGrid:
    """A Grid whose sites are ``alive``; those that are answer every message with ``reply``."""

    def __init__(self, alive: list[int], reply=None) -> None:  # type: ignore[no-untyped-def]
        self.alive, self.reply, self.sent = alive, reply, []

    def get_node_ids(self) -> list[int]:
        return list(self.alive)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, metadata=message_metadata(0, dst_node_id, message_type, f"0-{dst_node_id}"))

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.sent.append(len(messages))
        return [self.reply(m) for m in messages if m.metadata.dst_node_id in self.alive] if self.reply else []


def test_sampling_waits_a_bounded_time_for_missing_sites() -> None:
    strategy = GroupedFedAvg(["generator"], {"generator.w": (2,)}, min_available_nodes=3, min_train_nodes=3,
                             min_evaluate_nodes=3)
    strategy.set_node_waits(first=1.0, later=0.5)
    arrays = ArrayRecord({"generator.w": Array(np.zeros(2, np.float32))})
    grid = FakeGrid([11, 12])  # the third site was killed
    started = time.monotonic()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert time.monotonic() - started < 5  # Flower's own sampling would wait forever here
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    assert "only 2 of 3 sites connected" in strategy.rounds[1].waited
    started = time.monotonic()
    assert len(list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), grid))) == 2  # type: ignore[arg-type]
    assert time.monotonic() - started < 3
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (3, 3)  # restored for the next round


def test_a_site_lost_mid_round_is_named_once_and_the_round_is_recorded() -> None:
    strategy = GroupedFedAvg(["generator"], {"generator.w": (2,)}, min_available_nodes=2, min_train_nodes=2,
                             min_evaluate_nodes=2)
    strategy.set_node_waits(first=1.0, later=0.5)
    arrays = ArrayRecord({"generator.w": Array(np.zeros(2, np.float32))})
    grid = FakeGrid([11, 12])
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), grid))  # type: ignore[arg-type]
    grid.alive = [11]  # node 12 dies before it answers
    replies = [_error_from(11, messages[0].metadata.message_type, "line one\nline two " + "x" * 500)]
    strategy.aggregate_train(1, replies)
    strategy.aggregate_evaluate(1, [])
    excluded = strategy.rounds[1].excluded
    assert sorted(e["node"] for e in excluded) == [11, 12]  # each once
    reason_11 = next(e["reason"] for e in excluded if e["node"] == 11)
    assert "\n" not in reason_11 and len(reason_11) <= 320
    assert "no reply" in next(e["reason"] for e in excluded if e["node"] == 12)
    assert strategy.rounds[1].failed  # recorded: the model stayed as it was


def test_a_study_without_one_usable_round_fails_loudly(tmp_path: Path) -> None:
    study = StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu", "round_timeout": 2.0},
        task={"image_size": 16, "batch_size": 4, "local_steps": 1, "width": 8, "z_dim": 8, "eval_samples": 8},
    )

    def refuse(message: Message) -> Message:
        return _error_from(message.metadata.dst_node_id, message.metadata.message_type, "privacy policy: refused")

    grid = FakeGrid([1, 2], refuse)
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(StudyFailed, match="without one usable round"):
        run_study(grid, study, folder)  # type: ignore[arg-type]
    records = folder.read_metrics()
    assert [r["round"] for r in records] == [0, 1, 2]  # every round recorded all the same
    assert all(r["round-failed"] for r in records[1:])
    folder.check_free()  # and the folder is released


def test_medgan_run_exits_non_zero_when_the_federation_trained_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployed path: flwr run may end with 0 although every site refused; medgan run may not."""
    from typer.testing import CliRunner

    import server.deploy
    from medgan_core.credentials import init_certificates
    from medgan.cli import app

    init_certificates(tmp_path / "certs", ["localhost"])
    coordinator = tmp_path / "coordinator.toml"
    coordinator.write_text(f'[coordinator]\ncerts-dir = "{tmp_path / "certs"}"\n')
    study = tmp_path / "study.toml"
    study.write_text(f'[run]\nrounds = 1\nout-dir = "{tmp_path / "run"}"\n')
    folder = RunFolder(tmp_path / "run")

    def every_site_refused(config, study_config, timeout=None):  # type: ignore[no-untyped-def]
        folder.start(study_config)
        folder.append_metrics({"round": 0, "sites": [{"node": 1, "evaluate": {}}]})
        folder.append_metrics({"round": 1, "sites": [], "round-failed": "only 0 of 3 sites answered (need 2)",
                               "excluded": [{"node": 1, "reason": "site error: privacy policy: refused"}]})
        return 0

    monkeypatch.setattr(server.deploy, "submit_study", every_site_refused)
    result = CliRunner().invoke(app, ["run", "--config", str(study), "--federation", str(coordinator)])
    assert result.exit_code == 2 and "without one usable round" in result.output, result.output


def test_an_error_the_superlink_writes_for_a_lost_node_names_that_node() -> None:
    """Flower's SuperLink answers for a node that stopped its heartbeats with an error whose
    source is the SuperLink itself (node 1): the exclusion must still name the lost site, once."""
    strategy = GroupedFedAvg(["generator"], {"generator.w": (2,)}, min_available_nodes=2, min_train_nodes=2,
                             min_evaluate_nodes=2)
    strategy.set_node_waits(first=1.0, later=0.5)
    arrays = ArrayRecord({"generator.w": Array(np.zeros(2, np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid([11, 12])))  # type: ignore[arg-type]
    for index, message in enumerate(messages):  # what the grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"sent-{index}"
    lost = next(m for m in messages if m.metadata.dst_node_id == 12)
    unavailable = Message(Error(code=2, reason="Node Unavailable"), metadata=Metadata(
        run_id=1, message_id="e1", src_node_id=1, dst_node_id=0, reply_to_message_id=lost.metadata.message_id,
        group_id="", created_at=time.time(), ttl=60.0, message_type=lost.metadata.message_type))
    strategy.aggregate_train(1, [unavailable])  # node 11 sent nothing at all
    excluded = {e["node"]: e["reason"] for e in strategy.rounds[1].excluded}
    assert excluded == {11: "no reply before the round timeout", 12: "site error: Node Unavailable"}
    assert len(strategy.rounds[1].excluded) == 2  # no entry for the SuperLink's own id, none twice


def test_a_site_refuses_a_round_longer_than_its_policy_allows(tiny_sites: list[Path], tiny_study: StudyConfig,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A buggy or hostile study asking a hospital for a million local steps would hold its
    machine for days: the site's ``max-steps-per-round`` refuses the round before any step
    runs, and the coordinator learns why in one line; the site's state is untouched. (Asked
    for 250 here, so that a site that ignored its cap would fail this test, not hang it.)"""
    import client.app
    from client.app import build_client_app
    from client_messages import client_request, round_config
    from flwr.app import Context, MessageType, RecordDict

    from medgan_core.tasks.registry import build_task

    study = tiny_study.replace(task={"local_steps": 250}, privacy={"enabled": False})
    state = tmp_path / "state"
    node = {"data-path": str(tiny_sites[0]), "state-dir": str(state), "site-name": "st-mary",
            "max-steps-per-round": "200", "require-dp": "false", "require-secure-rng": "false"}
    request = client_request(MessageType.TRAIN, round_config(study, "long"), build_task(study.task).get_weights())
    trained: list[int] = []
    original = client.app.train_site_round

    def watched(task, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_train = task.train
        task.train = lambda data, steps, *a, **k: trained.append(steps) or original_train(data, steps, *a, **k)
        return original(task, *args, **kwargs)

    monkeypatch.setattr(client.app, "train_site_round", watched)
    reply = build_client_app()(request, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                                                run_config={}))
    assert reply.has_error()
    assert reply.error.reason == ("[st-mary] site policy: site st-mary runs at most 200 training steps a round "
                                  "(max-steps-per-round), the study asks for 250 local steps; refused by the "
                                  "site's policy")
    assert trained == [] and not any(p.name.startswith("state-") for p in state.glob("*"))
