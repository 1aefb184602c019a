"""Nothing but weights and declared scalars leaves a site (issue 19, points 3-5).

Attacks tried: images smuggled out as thousands of scalar metrics, training losses
released outside ε under DP, held-out scores sent against the site's policy, and site
errors that carry the hospital's file paths and tracebacks to the coordinator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import build_client_app
from client_messages import client_request, round_config
from client.audit import AUDIT_BLOCKED, MAX_METRICS, audit_outgoing_mod
from client.site_errors import SITE_ERROR, mask_paths, one_line_reason
from medgan_core.config import SiteConfig
from medgan_core.study_config import StudyConfig
from medgan_core.errors import DataError
from medgan_core.site_round import PRIVACY_METRICS
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import task_class, task_config, task_names

pytestmark = pytest.mark.security
GLOBAL = {"generator.w": np.zeros((3, 3), np.float32)}


def _request(kind: str, config: dict, arrays: dict[str, np.ndarray] | None = None) -> Message:  # type: ignore[type-arg]
    return client_request(kind, config, arrays or GLOBAL)


def _audited(metrics: dict[str, float], kind: str = MessageType.TRAIN, task: str = "denoise",
             private: bool = True) -> Message:
    app = ClientApp(mods=[audit_outgoing_mod])
    arrays = {"arrays": ArrayRecord({k: Array(v + 1) for k, v in GLOBAL.items()})} if kind == MessageType.TRAIN else {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({**arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return app(_request(kind, {"task.name": task, "privacy.enabled": private}), context)


# --- 3: only declared names, a bounded count ----------------------------------------------------
def test_a_slice_smuggled_out_as_scalar_metrics_is_blocked() -> None:
    slice_ = np.random.default_rng(0).normal(size=(64, 64))
    leak = {"num-examples": 10, **{f"px-{i}": float(v) for i, v in enumerate(slice_.ravel())}}
    reply = _audited(leak, private=False)
    assert reply.has_error() and reply.error.code == AUDIT_BLOCKED
    assert f"at most {MAX_METRICS}" in reply.error.reason and "not declared" in reply.error.reason


def test_a_few_undeclared_scalars_are_blocked_too() -> None:
    reply = _audited({"num-examples": 10, "epsilon": 1.0, "mean-hu-of-patient-17": 42.0})
    assert reply.has_error() and "mean-hu-of-patient-17" in reply.error.reason


def test_every_task_declares_what_it_reports(tiny_sites: list[Path]) -> None:
    """The declarations are the truth: a task reporting an undeclared name would be blocked."""
    from medgan_core.tasks.registry import load_task_data

    for name in task_names():
        config = task_config(name=name, image_size=16, batch_size=4, local_steps=1, width=8,
                             modality="MR" if name == "recon" else "CT")
        task = build_task(config)
        data = load_task_data(tiny_sites[0], config)
        assert set(task.train(data, 1, 0)) <= task_class(name).train_metrics, name
        assert set(task.evaluate(data)) <= task_class(name).eval_metrics, name
        assert task_class(name).headline_metric in task_class(name).eval_metrics, name


# --- 4: under DP, nothing computed from images outside the mechanism ---------------------------------
def test_under_dp_training_losses_are_blocked_and_privacy_fields_pass() -> None:
    blocked = _audited({"num-examples": 10, "epsilon": 1.0, "loss-d": 0.7})
    assert blocked.has_error() and "loss-d" in blocked.error.reason
    fine = _audited({"num-examples": 10, **{k: 1.0 for k in PRIVACY_METRICS}})
    assert not fine.has_error()
    without_dp = _audited({"num-examples": 10, "loss-d": 0.7, "loss-l1": 0.1}, private=False)
    assert not without_dp.has_error()


def _site_round_replies(tiny_sites: list[Path], tmp_path: Path, study: StudyConfig,
                        site: SiteConfig) -> tuple[Message, Message]:
    app = build_client_app([site])
    task = build_task(study.task)
    config = round_config(study, "leak")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    train = app(_request(MessageType.TRAIN, config, task.get_weights()), context)
    evaluate = app(_request(MessageType.EVALUATE, config, task.get_weights()), context)
    return train, evaluate


def test_a_dp_site_sends_only_privacy_fields_and_scores_its_policy_allows(
    tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path
) -> None:
    study = tiny_study.replace(task={"name": "denoise"}, privacy={"secure_rng": False, "target_epsilon": 50.0})
    hospital = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "h"), release_test_metrics=False)
    train, evaluate = _site_round_replies(tiny_sites, tmp_path, study, hospital)
    assert not train.has_error(), train.error.reason if train.has_error() else ""
    sent = set(train.content["metrics"])
    assert sent <= PRIVACY_METRICS | {"num-examples"} and "epsilon" in sent and "loss-d" not in sent
    assert set(evaluate.content["metrics"]) == {"num-examples"}  # held-out scores stay at the hospital
    researcher = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "r"), release_test_metrics=True)
    _, evaluate = _site_round_replies(tiny_sites, tmp_path, study, researcher)
    assert {"psnr", "ssim"} <= set(evaluate.content["metrics"])


# --- 5: a failing site sends one line without paths --------------------------------------------------
def test_site_errors_reach_the_coordinator_as_one_line_without_paths(
    tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path
) -> None:
    secret = tmp_path / "St-Mary" / "MRN-0012345"
    secret.mkdir(parents=True)
    (secret / "manifest.csv").write_text("file,subject,modality,split\nct/MRN-0012345,MRN-0012345,CT,train\n")
    site = SiteConfig(str(secret), state_dir=str(tmp_path / "state"))
    train, _ = _site_round_replies(tiny_sites, tmp_path, tiny_study, site)
    assert train.has_error() and train.error.code == SITE_ERROR
    reason = train.error.reason
    assert "\n" not in reason and "Traceback" not in reason and len(reason) <= 300
    assert "St-Mary" not in reason and str(tmp_path) not in reason and "<path>" in reason


def test_path_masking_and_unexpected_errors() -> None:
    assert mask_paths("file /data/a b/x.dcm and C:\\PACS\\1.dcm and \\\\srv\\share") == (
        "file <path> b<path> and <path> and <path>")
    assert "internal error (KeyError)" in one_line_reason(KeyError("/home/jane/patient-7"))
    assert "jane" not in one_line_reason(KeyError("/home/jane/patient-7"))
    assert one_line_reason(DataError("x" * 1000)).endswith("…")
