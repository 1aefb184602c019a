"""What the coordinator tells every site each round, parsed once at the site, typed, with no defaults.

The coordinator builds it from the study (``for_study``) and it travels as one flat Flower
ConfigRecord (``to_flat``: ``task.*``, ``privacy.*``, ``aggregation.*`` and a few round
keys; Flower's strategies add ``server-round``). A site rebuilds it with ``from_flat``,
which validates every table and refuses a message that lacks a key instead of guessing
(a missing study id must not silently become another study's accountant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import dataclasses

from medgan_core.config import (
    AggregationConfig,
    PrivacyConfig,
    TaskConfig,
    aggregation_config_from_flat,
    config_key,
    privacy_config_from_flat,
    table_items,
)
from medgan_core.errors import ConfigError
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import task_config_from_items

ROUND_KEYS = ("device", "planned-rounds", "study-id", "server-round")


@dataclass(frozen=True)
class RoundInstructions:
    task: TaskConfig
    privacy: PrivacyConfig
    aggregation: AggregationConfig
    device: str  # the study's hint; a site's own device setting wins
    planned_rounds: int  # for the DP noise plan and the learning-rate schedule
    study_id: str  # names the site's accountant and kept state
    server_round: int

    @staticmethod
    def for_study(study: StudyConfig, study_id: str) -> dict[str, Any]:
        """The flat items the coordinator sends (without ``server-round``, which Flower adds)."""
        shared = {k: v for k, v in study.to_flat().items() if k.startswith(("task.", "privacy.", "aggregation."))}
        return {**shared, "device": study.run.device, "planned-rounds": study.run.rounds, "study-id": study_id}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RoundInstructions":
        missing = [key for key in ROUND_KEYS if key not in flat]
        if missing:
            raise ConfigError(f"the round's instructions lack {', '.join(missing)}; refusing to guess them")
        study_id = str(flat["study-id"])
        if not study_id.strip() or any(c in study_id for c in "/\\") or study_id in (".", ".."):
            raise ConfigError(f"study-id {study_id!r} cannot name a file at the site")
        try:
            planned, server_round = int(flat["planned-rounds"]), int(flat["server-round"])
        except (TypeError, ValueError):
            raise ConfigError("planned-rounds and server-round must be whole numbers") from None
        if planned < 1 or server_round < 0:
            raise ConfigError(f"planned-rounds = {planned}, server-round = {server_round}; out of range")
        task = task_config_from_items(table_items(flat, "task"), "round config")
        privacy, aggregation = privacy_config_from_flat(flat), aggregation_config_from_flat(flat)
        expected = {f"task.{key}" for key in task.to_items()} | {
            f"{table}.{config_key(f.name)}" for table, config in (("privacy", privacy), ("aggregation", aggregation))
            for f in dataclasses.fields(config)}
        if missing := sorted(expected - set(flat)):
            raise ConfigError(f"the round's instructions lack {', '.join(missing[:5])}; refusing to guess them")
        return cls(task, privacy, aggregation, str(flat["device"]), planned, study_id, server_round)
