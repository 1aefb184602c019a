"""The site's outgoing audit blocks anything but model weights and scalar metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import AUDIT_BLOCKED, audit_outgoing_mod
from client_messages import client_request

GLOBAL = {"generator.w": np.zeros((3, 3), np.float32), "discriminator.b": np.zeros(2, np.float32)}


def _request(kind: str, private: bool = True) -> Message:
    return client_request(kind, {"task.name": "synthesis", "privacy.enabled": private}, GLOBAL)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _app(make_reply) -> ClientApp:  # type: ignore[no-untyped-def]
    app = ClientApp(mods=[audit_outgoing_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(make_reply(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(make_reply(), reply_to=msg)

    return app


def _weights(**extra: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v + 0.5) for k, v in {**GLOBAL, **extra}.items()})


def test_a_proper_update_leaves() -> None:
    app = _app(lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4, "epsilon": 0.3})}))
    reply = app(_request(MessageType.TRAIN), _context())
    assert not reply.has_error()
    np.testing.assert_array_equal(reply.content["arrays"]["generator.w"].numpy(), np.full((3, 3), 0.5, np.float32))


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (lambda: RecordDict({"arrays": _weights(**{"generator.leak": np.zeros((64, 64), np.float32)}),
                             "metrics": MetricRecord({"num-examples": 4})}), "arrays not in the global model"),
        (lambda: RecordDict({"arrays": ArrayRecord({"generator.w": Array(np.zeros((64, 64), np.float32)),
                                                    "discriminator.b": Array(np.zeros(2, np.float32))}),
                             "metrics": MetricRecord({"num-examples": 4})}), "has shape (64, 64)"),
        (lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4, "scores": [0.1, 0.9]})}),
         "not a finite scalar"),
        (lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4}),
                             "note": ConfigRecord({"patient": "Jane Doe"})}), "config records"),
        (lambda: RecordDict({"arrays": _weights(), "images": ArrayRecord({"x": Array(np.zeros((8, 8), np.float32))}),
                             "metrics": MetricRecord({"num-examples": 4})}), "expected one array record"),
        # the site record carries a short name only: not a path, not a second key, not a long text
        (lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4}),
                             "site": ConfigRecord({"name": "/data/st-mary/MRN12345"})}), "only the site's name"),
        (lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4}),
                             "site": ConfigRecord({"name": "hospital-b", "patient": "Jane Doe"})}), "only the site's name"),
        (lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4}),
                             "site": ConfigRecord({"name": "a" * 65})}), "only the site's name"),
        (lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4}),
                             "site": ConfigRecord({"name": 3.5})}), "only the site's name"),
    ],
)
def test_a_reply_that_tries_to_leak_is_blocked(reply, why: str) -> None:  # type: ignore[no-untyped-def]
    answer = _app(reply)(_request(MessageType.TRAIN), _context())
    assert answer.has_error()
    assert answer.error.code == AUDIT_BLOCKED and why in answer.error.reason


def test_evaluation_replies_carry_no_arrays() -> None:
    leak = _app(lambda: RecordDict({"arrays": _weights(), "metrics": MetricRecord({"num-examples": 4})}))
    assert leak(_request(MessageType.EVALUATE), _context()).has_error()
    fine = _app(lambda: RecordDict({"metrics": MetricRecord({"num-examples": 4, "swd": 0.2})}))
    assert not fine(_request(MessageType.EVALUATE), _context()).has_error()


def test_a_reply_may_name_its_site() -> None:
    named = RecordDict({"metrics": MetricRecord({"num-examples": 4, "swd": 0.2}),
                        "site": ConfigRecord({"name": "St Mary 2"})})
    reply = _app(lambda: named)(_request(MessageType.EVALUATE), _context())
    assert not reply.has_error() and reply.content.config_records["site"]["name"] == "St Mary 2"


def _legacy_request(kind: str, config: dict, arrays: list[np.ndarray]) -> Message:
    """A legacy (NumPyClient) request, as SecAgg+'s coordinator sends it."""
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, fitins_to_recorddict

    parameters = ndarrays_to_parameters(arrays)
    content = (fitins_to_recorddict(FitIns(parameters, config), keep_input=True) if kind == MessageType.TRAIN
               else evaluateins_to_recorddict(EvaluateIns(parameters, config), keep_input=True))
    request = client_request(kind, {}, {})
    return Message(content, metadata=request.metadata)


def _fit_reply(arrays: list[np.ndarray], metrics: dict) -> RecordDict:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    return fitres_to_recorddict(FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), 4, metrics),
                                keep_input=True)


@pytest.mark.parametrize(
    ("arrays", "metrics", "why"),
    [
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3}, ""),
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32), np.zeros((64, 64), np.float32)], {"epsilon": 0.3},
         "only its weights may leave"),
        ([np.ones((64, 64), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3}, "only its weights may leave"),
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3, "loss-d": 0.7},
         "not declared"),  # under DP a loss stays at the site
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3, "dp": "Jane Doe"},
         "not a finite scalar"),
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3, "site-name": "St Mary's 2"}, ""),
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3, "site-name": "/data/Jane Doe"},
         "not a short site label"),  # the one text metric may hold a name, not a path or a record
        ([np.ones((3, 3), np.float32), np.ones(2, np.float32)], {"epsilon": 0.3, "site-name": 0.5},
         "not a short site label"),
    ],
)
def test_the_secagg_path_is_audited_before_masking(arrays, metrics, why: str) -> None:  # type: ignore[no-untyped-def]
    from client.audit import AUDIT_BLOCKED, audit_legacy_mod

    request = _legacy_request(MessageType.TRAIN, {"task.name": "synthesis", "privacy.enabled": True},
                              [np.zeros((3, 3), np.float32), np.zeros(2, np.float32)])
    reply = audit_legacy_mod(request, _context(), lambda msg, _ctx: Message(_fit_reply(arrays, metrics), reply_to=msg))
    if not why:
        assert not reply.has_error()
    else:
        assert reply.has_error() and reply.error.code == AUDIT_BLOCKED and why in reply.error.reason


def test_the_secagg_client_app_runs_the_audit(tiny_sites, tiny_study, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Wired in: a SecAgg+ site whose evaluation would send an undeclared score is stopped."""
    import client.secagg as secagg
    from client.audit import AUDIT_BLOCKED
    from client_messages import round_config
    from medgan_core.config import SiteConfig
    from medgan_core.sharing import ordered_names
    from medgan_core.tasks.registry import build_task

    study = tiny_study.replace(privacy={"secagg": True})
    task = build_task(study.task)
    weights = task.get_weights()
    request = _legacy_request(MessageType.EVALUATE, round_config(study, "secagg-audit"),
                              [weights[n] for n in ordered_names(task)])
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "state"))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    fine = secagg.build_secagg_client_app([site])(request, context)
    assert not fine.has_error(), fine.error.reason if fine.has_error() else ""
    assert "site-name" not in fine.content.config_records["evaluateres.metrics"]  # no name set: the node id names it
    named = secagg.build_secagg_client_app([dataclasses.replace(site, name="st-mary")])(request, context)
    assert named.content.config_records["evaluateres.metrics"]["site-name"] == "st-mary"
    monkeypatch.setattr(secagg.SiteNumPyClient, "evaluate", lambda self, p, c: (0.0, 4, {"pixel-0": 0.3}))
    leak = secagg.build_secagg_client_app([site])(request, context)
    assert leak.has_error() and leak.error.code == AUDIT_BLOCKED and "pixel-0" in leak.error.reason
