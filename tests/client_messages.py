"""Messages a coordinator sends a site's ClientApp, for tests that call the app directly."""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from medgan_core.study_config import StudyConfig


def message_metadata(src: int, dst: int, kind: str, message_id: str = "") -> Metadata:
    """Metadata of a ``kind`` message from node ``src`` to node ``dst`` (node 0: the coordinator)."""
    return Metadata(run_id=1, message_id=message_id, src_node_id=src, dst_node_id=dst, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type=kind)


def client_request(kind: str, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Message:
    """A ``kind`` (train/evaluate) message to node 7 with ``config`` and the global ``arrays``."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(dict(config))})
    return Message(content, metadata=message_metadata(0, 7, kind, "m1"))


def round_config(study: StudyConfig, study_id: str, server_round: int = 1) -> dict[str, Any]:
    """The flat config of ``study``'s round ``server_round`` as the coordinator sends it (one planned round)."""
    return {**{k: v for k, v in study.to_flat().items() if k.startswith(("task.", "privacy.", "aggregation."))},
            "planned-rounds": 1, "study-id": study_id, "server-round": server_round, "device": "cpu"}
