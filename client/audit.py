"""The site's last line of defence: a Flower mod that audits every outgoing reply.

Whatever the training code does, a reply leaves the site only if it holds
* for training: exactly one ArrayRecord whose arrays are named and shaped like arrays of
  the global model the server sent (weights, never images or per-sample values), floats
  only; arrays may be withheld (local groups and normalisation layers stay at the site);
* for evaluation: no arrays at all;
* exactly one MetricRecord of at most ``MAX_METRICS`` finite scalars (no lists) whose
  names the task declares (``Task.train_metrics``/``eval_metrics``) or the privacy
  bookkeeping (``PRIVACY_METRICS``); under DP a training reply carries only the latter;
* at most one ConfigRecord, ``site``, holding only the site's ``name``: a short label
  (``is_site_name``: no path, at most 64 characters), and nothing else.
Anything else is blocked, logged at the site, and replaced by an error reply that says
why, so the coordinator leaves the site out of the round. The SecAgg+ path (a legacy
NumPyClient) has its own form of reply, audited to the same rule by ``audit_legacy_mod``.
"""

from __future__ import annotations

import math
from logging import WARNING
from typing import Callable

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from client.payload import NUM_EXAMPLES
from medgan_core.site_label import LEGACY_SITE_NAME_KEY, SITE_NAME_KEY, SITE_RECORD, is_site_name
from medgan_core.errors import MedGANError
from medgan_core.site_round import PRIVACY_METRICS
from medgan_core.tasks.registry import task_class

AUDIT_BLOCKED = 4031  # error code of a reply the audit refused to send
MAX_METRICS = 64  # far above any task's declared scalars; a slice of 4096 pixels cannot pass


def allowed_metric_names(request: Message, config_record: str = "config") -> frozenset[str] | None:
    """The metric names a reply to ``request`` may carry (None: the request names no known task)."""
    config = request.content.config_records.get(config_record)
    if config is None or "task.name" not in config:
        return None
    try:
        task = task_class(str(config["task.name"]))
    except MedGANError:
        return None
    if request.metadata.message_type == MessageType.TRAIN:
        private = bool(config.get("privacy.enabled", True))
        names = PRIVACY_METRICS if private else PRIVACY_METRICS | task.train_metrics
    else:
        names = task.eval_metrics
    return names | {NUM_EXAMPLES}


def audit_problems(request: Message, reply: Message) -> list[str]:
    """What is wrong with ``reply`` as an answer to ``request`` (empty: it may leave)."""
    content = reply.content
    problems = []
    others = sorted(set(content.config_records) - {SITE_RECORD})
    if others:
        problems.append(f"config records {others} may not leave the site")
    if SITE_RECORD in content.config_records:
        site = content.config_records[SITE_RECORD]
        if set(site) != {SITE_NAME_KEY} or not is_site_name(site[SITE_NAME_KEY]):
            problems.append(f"the '{SITE_RECORD}' record may hold only the site's name, a short label")
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        problems.append(f"expected one metric record, found {len(metric_records)}")
    allowed = allowed_metric_names(request)
    if allowed is None:
        problems.append("the request names no known task, so no metric is declared")
    for record in metric_records:
        if len(record) > MAX_METRICS:
            problems.append(f"{len(record)} metrics; at most {MAX_METRICS} may leave")
        undeclared = sorted(set(record) - (allowed or frozenset()))
        if undeclared:
            problems.append(f"metrics not declared for this reply: {undeclared[:5]}"
                            + (f" and {len(undeclared) - 5} more" if len(undeclared) > 5 else ""))
        for name, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"metric {name!r} is not a finite scalar")
                break
    expected = {}
    if request.metadata.message_type == MessageType.TRAIN:
        incoming = list(request.content.array_records.values())
        expected = {name: tuple(array.shape) for record in incoming for name, array in record.items()}
    arrays = {name: array for record in content.array_records.values() for name, array in record.items()}
    if request.metadata.message_type == MessageType.TRAIN and len(content.array_records) != 1:
        problems.append(f"expected one array record, found {len(content.array_records)}")
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        problems.append(f"arrays not in the global model: {unexpected[:5]}")
    for name, array in arrays.items():
        if name in expected and tuple(array.shape) != expected[name]:
            problems.append(f"array {name} has shape {tuple(array.shape)}, the model's is {expected[name]}")
        if name in expected and not np.issubdtype(np.dtype(array.dtype), np.floating):
            problems.append(f"array {name} has dtype {array.dtype}; only float weights may leave")
    return problems


#: The legacy (NumPyClient) records of a request and its reply, by message type.
LEGACY = {MessageType.TRAIN: ("fitins", "fitres"), MessageType.EVALUATE: ("evaluateins", "evaluateres")}
LEGACY_STATUS = {"code": 0, "message": "Success"}  # what Flower's NumPyClient wrapper says of every result


def legacy_audit_problems(request: Message, reply: Message) -> list[str]:
    """``audit_problems`` for a legacy NumPyClient's reply (the SecAgg+ path, checked before
    ``secaggplus_mod`` masks it): its weights are the global model's arrays again (as many,
    each of the same serialised size: the same shape and dtype), its metrics are declared
    finite scalars (and the site's name, a short label), and nothing else is in it."""
    if request.metadata.message_type not in LEGACY:
        return [f"message type {request.metadata.message_type!r} is not one a site answers"]
    ins, res = LEGACY[request.metadata.message_type]
    content, problems = reply.content, []
    train = request.metadata.message_type == MessageType.TRAIN
    expected = {"config": {f"{res}.metrics", f"{res}.status"},
                "metric": {f"{res}.num_examples"} | (set() if train else {f"{res}.loss"}),
                "array": {f"{res}.parameters"} if train else set()}
    for kind, records in (("config", content.config_records), ("metric", content.metric_records),
                          ("array", content.array_records)):
        if set(records) != expected[kind]:
            problems.append(f"{kind} records {sorted(records)}; a {res} reply holds {sorted(expected[kind])}")
    allowed = allowed_metric_names(request, f"{ins}.config")
    if allowed is None:
        problems.append("the request names no known task, so no metric is declared")
    metrics = dict(content.config_records.get(f"{res}.metrics") or {})
    if LEGACY_SITE_NAME_KEY in metrics and not is_site_name(metrics.pop(LEGACY_SITE_NAME_KEY)):
        problems.append(f"the {LEGACY_SITE_NAME_KEY!r} metric is not a short site label")
    if len(metrics) > MAX_METRICS:
        problems.append(f"{len(metrics)} metrics; at most {MAX_METRICS} may leave")
    undeclared = sorted(set(metrics) - (allowed or frozenset()))
    if undeclared:
        problems.append(f"metrics not declared for this reply: {undeclared[:5]}")
    scalars = [*metrics.items(), *(item for name in expected["metric"] for item in (content.metric_records.get(name)
                                                                                    or {}).items())]
    for name, value in scalars:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"metric {name!r} is not a finite scalar")
            break
    status = content.config_records.get(f"{res}.status")
    if status is not None and dict(status) != LEGACY_STATUS:
        problems.append("the status may say only that the round succeeded")
    if train:
        sent = [len(a.data) for a in (content.array_records.get(f"{res}.parameters") or {}).values()]
        model = [len(a.data) for a in (request.content.array_records.get(f"{ins}.parameters") or {}).values()]
        if sent != model:
            problems.append(f"{len(sent)} arrays of {sum(sent)} bytes; the global model is {len(model)} arrays of "
                            f"{sum(model)} bytes, and only its weights may leave")
    return problems


def _audited(problems_of: Callable[[Message, Message], list[str]]) -> Callable[..., Message]:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        problems = problems_of(msg, reply)
        if not problems:
            return reply
        reason = "blocked by the site's outgoing audit: " + "; ".join(problems)
        log(WARNING, "%s", reason)
        return Message(Error(code=AUDIT_BLOCKED, reason=reason), reply_to=msg)

    return mod


#: The audit of every reply of the Message-API ClientApp (its last mod).
audit_outgoing_mod = _audited(audit_problems)
#: The audit of a legacy NumPyClient's replies, inside ``secaggplus_mod`` (``client.secagg``).
audit_legacy_mod = _audited(legacy_audit_problems)
