"""The site's last line of defence: a Flower mod that audits every outgoing reply.

Whatever the training code does, a reply leaves the site only if it holds
* for training: exactly one ArrayRecord whose arrays are named and shaped like arrays of
  the global model the server sent (weights, never images or per-sample values), floats
  only; arrays may be withheld (local groups and normalisation layers stay at the site);
* for evaluation: no arrays at all;
* exactly one MetricRecord of finite scalars (no lists), and nothing else.
Anything else is blocked, logged at the site, and replaced by an error reply that says
why, so the coordinator leaves the site out of the round.
"""

from __future__ import annotations

import math
from logging import WARNING

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

AUDIT_BLOCKED = 4031  # error code of a reply the audit refused to send


def audit_problems(request: Message, reply: Message) -> list[str]:
    """What is wrong with ``reply`` as an answer to ``request`` (empty: it may leave)."""
    content = reply.content
    problems = []
    if len(content.config_records):
        problems.append(f"config records {sorted(content.config_records)} may not leave the site")
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        problems.append(f"expected one metric record, found {len(metric_records)}")
    for record in metric_records:
        for name, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"metric {name!r} is not a finite scalar")
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


def audit_outgoing_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    problems = audit_problems(msg, reply)
    if not problems:
        return reply
    reason = "blocked by the site's outgoing audit: " + "; ".join(problems)
    log(WARNING, "%s", reason)
    return Message(Error(code=AUDIT_BLOCKED, reason=reason), reply_to=msg)
