"""What a site may send: named weight arrays of the task's model, scalar metrics, and its name.

Every reply is built here, so the one place that decides what leaves a hospital is
small enough to read. Images and per-sample values cannot pass: arrays must match the
model's parameter names and shapes, metrics must be finite scalars, and the one text is
the site's configured name (``SiteConfig.announced_name``), so the coordinator can say
which hospital answered.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medgan_core.arrays import check_arrays
from medgan_core.site_label import SITE_NAME_KEY, SITE_RECORD, is_site_name
from medgan_core.errors import WeightsError

NUM_EXAMPLES = "num-examples"


def site_record(site_name: str) -> dict[str, ConfigRecord]:
    """The reply's record of the site's name (none when the site has no name to announce)."""
    if not site_name:
        return {}
    if not is_site_name(site_name):
        raise WeightsError(f"site name {site_name!r} is not a short label; it will not be sent")
    return {SITE_RECORD: ConfigRecord({SITE_NAME_KEY: site_name})}


def scalar_metrics(metrics: Mapping[str, float], num_examples: int) -> MetricRecord:
    record: dict[str, float | int] = {NUM_EXAMPLES: int(num_examples)}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WeightsError(f"metric {name!r} = {value!r} is not a finite scalar; it will not be sent")
        record[name] = float(value)
    return MetricRecord(record)


def train_reply(
    arrays: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    metrics: Mapping[str, float],
    num_examples: int,
    site_name: str = "",
) -> RecordDict:
    """The content of a training reply: one ArrayRecord of model weights, one MetricRecord,
    and the site's name."""
    check_arrays(arrays, expected_shapes, "local update")
    record = ArrayRecord({name: Array(np.ascontiguousarray(a, dtype=np.float32)) for name, a in arrays.items()})
    return RecordDict({"arrays": record, "metrics": scalar_metrics(metrics, num_examples), **site_record(site_name)})


def evaluate_reply(metrics: Mapping[str, float], num_examples: int, site_name: str = "") -> RecordDict:
    return RecordDict({"metrics": scalar_metrics(metrics, num_examples), **site_record(site_name)})
