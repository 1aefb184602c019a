"""The site's outgoing audit blocks anything but model weights and scalar metrics."""

from __future__ import annotations

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
