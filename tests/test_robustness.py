"""Fault tolerance: faulty sites are left out with a reason, and too few answers leave the model
as it was. (A resumed run ending where an uninterrupted one does: ``test_aggregation_federated``.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from medgan_core.study_config import StudyConfig
from medgan_core.fileio import read_jsonl
from medgan_core.checkpoints import load_checkpoint
from medgan.simulation import simulate_federation
from server.study import StudyFailed

pytestmark = pytest.mark.slow


def _study(rounds: int, **run: object) -> StudyConfig:
    return StudyConfig().replace(
        run={"rounds": rounds, "num_sites": 2, "device": "cpu", **run},
        task={"image_size": 16, "batch_size": 8, "local_steps": 3, "width": 8, "z_dim": 8, "eval_samples": 16},
        privacy={"secure_rng": False},
    )


def _faulty(kind: str | dict[int, str], partition: int = 0, rounds: tuple[int, ...] = (1,)):  # type: ignore[no-untyped-def]
    """A Flower mod that breaks one site's training reply in the given rounds (``kind``: one
    fault for every such round, or a fault per round)."""
    faults = kind if isinstance(kind, dict) else {r: kind for r in rounds}

    def mod(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, ctxt)
        hit = ctxt.node_config.get("partition-id") == partition and msg.metadata.message_type == "train"
        server_round = int(msg.content["config"]["server-round"])
        if not hit or server_round not in faults:
            return reply
        kind = faults[server_round]
        if kind == "crash":
            raise RuntimeError("simulated site crash")
        arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
        name = sorted(arrays)[0]
        if kind == "nan":
            arrays[name].flat[0] = np.nan
        else:  # wrong shape
            arrays[name] = np.zeros(7, np.float32)
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply

    return mod


def test_a_faulty_site_is_left_out_and_the_run_goes_on(tiny_sites: list[Path], tmp_path: Path) -> None:
    """One federation, one fault a round (NaN weights, a wrong shape, a crash), then a clean round."""
    faults = {1: "nan", 2: "shape", 3: "crash"}
    simulate_federation(_study(4), tiny_sites, tmp_path / "run", client_mods=[_faulty(faults)])
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    for server_round, kind in faults.items():
        record = records[server_round]
        assert len(record["excluded"]) == 1 and len(record["sites"]) == 2, kind  # it still evaluated
        assert {"nan": "NaN", "shape": "shape", "crash": "site error"}[kind] in record["excluded"][0]["reason"]
        assert not record["round-failed"], kind
        before, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / f"round-{server_round - 1:03d}.safetensors")
        after, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / f"round-{server_round:03d}.safetensors")
        assert any(not np.array_equal(before[k], after[k]) for k in before), kind  # the other site's update counted
    assert not records[4]["excluded"]


def test_too_few_answers_leave_the_model_unchanged(tiny_sites: list[Path], tmp_path: Path) -> None:
    with pytest.raises(StudyFailed, match="without one usable round"):  # and the CLI exits non-zero
        simulate_federation(_study(1, min_answer_fraction=1.0), tiny_sites, tmp_path / "run",
                            client_mods=[_faulty("nan")])
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]
    assert record["round-failed"] == "only 1 of 2 sites answered (need 2)"
    before, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-000.safetensors")
    after, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-001.safetensors")
    assert all(np.array_equal(before[k], after[k]) for k in before)
