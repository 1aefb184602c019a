"""A whole study, validated on load: ``[run]``, ``[task]``, ``[privacy]``, ``[aggregation]``.

A study file is TOML. The same schema travels to Flower as a flat run config with dotted
keys (``run.rounds``, ``task.image-size``), which is what ``[tool.flwr.app.config]`` in
pyproject.toml holds, so ``flwr run .`` and ``medgan demo`` read identical settings. The
``[task]`` table holds the keys every task shares and the named task's own keys, which
that task types and checks (its ``Params``, found through ``medgan_core.tasks.registry``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from medgan_core.config import (
    AggregationConfig,
    PrivacyConfig,
    RunConfig,
    TaskConfig,
    build_table,
    config_key,
    load_tables,
)
from medgan_core.errors import ConfigError
from medgan_core.tasks.registry import (
    SHARED_KEYS,
    default_params,
    replace_task,
    task_config_from_items,
    validate_task_config,
)

TABLES = ("run", "task", "privacy", "aggregation")
#: ``[task] params``: the named task's own keys as the body of a TOML inline table
#: (``"scale = 4, l1-weight = 50.0"``). Flower's run config has a fixed set of keys (those
#: in pyproject.toml), the same for every task, so ``flwr run`` and a deployed study carry
#: a task's own keys in this one shared key; a study file may also write them directly.
PARAMS_KEY = "params"


def _task_items(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``[task]`` with the keys folded into ``params`` unfolded (a key given both ways: refused)."""
    items = dict(table)
    text = items.pop(PARAMS_KEY, "")
    if not isinstance(text, str):
        raise ConfigError(f"{source}: task.params = {text!r}; expected text such as \"scale = 4, l1-weight = 50.0\"")
    if not text.strip():
        return items
    try:
        folded = tomllib.loads(f"params = {{ {text} }}")["params"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: task.params = {text!r} is not 'KEY = VALUE, …' in TOML ({exc})") from None
    if twice := sorted(folded.keys() & items.keys()):
        raise ConfigError(f"{source}: task.{twice[0]} is given both directly and in task.params; give it once")
    return {**items, **folded}


def _default_task() -> TaskConfig:
    return TaskConfig(params=default_params(TaskConfig.name))


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: the run, the task, privacy and aggregation settings."""

    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=_default_task)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    def validate(self) -> "StudyConfig":
        self.run.validate()
        validate_task_config(self.task)
        self.privacy.validate()
        self.aggregation.validate()
        if getattr(self.task.params, "trainable", "all") != "all" and not self.run.initial_model:
            raise ConfigError(f"task.trainable = {self.task.params.trainable!r} fine-tunes a trained model; set "
                              "run.initial-model to one (a model trained on public data), or task.trainable = 'all'")
        if self.privacy.enabled and (refusal := self.task.params.dp_refusal(self.privacy.unit)):
            raise ConfigError(refusal)
        agg = self.aggregation
        if getattr(self.task.params, "histogram_start", False) and not agg.local_calibration:
            raise ConfigError("task.histogram-start fits an intensity map to each site's own scanners, kept at the "
                              "site between rounds: set aggregation.local-calibration = true")
        robust = agg.nonlinear_policies()
        if self.privacy.central_noise_multiplier > 0 and robust:
            raise ConfigError(
                f"aggregation policy {robust[0]!r} cannot be combined with privacy.central-noise-multiplier: "
                "central DP needs an equal-weight mean of clipped updates"
            )
        if self.privacy.secagg and (robust or agg.has_site_state or agg.has_server_state
                                    or agg.proximal_mu > 0):
            raise ConfigError(
                "privacy.secagg supports plain averaging only: leave [aggregation] at its defaults "
                "(secure aggregation hides individual updates, so robust or per-site policies cannot see them)"
            )
        return self

    # --- nested dict (TOML) -------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "StudyConfig":
        unknown = set(raw) - set(TABLES)
        if unknown:
            raise ConfigError(
                f"{source}: unknown table(s) {sorted(unknown)}; allowed: {', '.join(f'[{t}]' for t in TABLES)}"
            )
        run = build_table(RunConfig, raw.get("run", {}), "run", source)
        task = task_config_from_items(_task_items(raw.get("task", {}), source), source)
        privacy = build_table(PrivacyConfig, raw.get("privacy", {}), "privacy", source)
        aggregation = build_table(AggregationConfig, raw.get("aggregation", {}), "aggregation", source)
        return cls(run=run, task=task, privacy=privacy, aggregation=aggregation).validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        tables = {table: {config_key(k): v for k, v in dataclasses.asdict(getattr(self, table)).items()}
                  for table in TABLES if table != "task"}
        return {**tables, "task": self.task.to_items()}

    # --- flat dotted dict (Flower run config) ----------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], source: str = "run config") -> "StudyConfig":
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            table, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"{source}: key {key!r} must be TABLE.NAME with TABLE one of {', '.join(TABLES)}")
            nested.setdefault(table, {})[name] = value
        return cls.from_dict(nested, source)

    def to_flat(self) -> dict[str, Any]:
        """Every key as ``TABLE.key`` (what the coordinator sends the sites each round)."""
        return {f"{table}.{k}": v for table, values in self.to_dict().items() for k, v in values.items()}

    def to_run_config(self) -> dict[str, dict[str, Any]]:
        """Tables for Flower's run config: the task's own keys folded into ``task.params``,
        because Flower accepts only the keys pyproject.toml lists, the same for every task."""
        tables = self.to_dict()
        shared = {k: v for k, v in self.task.to_items().items() if k in SHARED_KEYS}
        own = {k: v for k, v in tables["task"].items() if k not in SHARED_KEYS}
        inline = tomli_w.dumps({"p": own}).strip().removeprefix("[p]").strip().replace("\n", ", ")
        return {**tables, "task": {**shared, PARAMS_KEY: inline}}

    def replace(
        self,
        run: Mapping[str, Any] | None = None,
        task: Mapping[str, Any] | None = None,
        privacy: Mapping[str, Any] | None = None,
        aggregation: Mapping[str, Any] | None = None,
    ) -> "StudyConfig":
        """A copy with some fields changed (Python field names; ``task`` takes the shared
        fields and the task's own), validated again."""
        return StudyConfig(
            run=dataclasses.replace(self.run, **(run or {})),
            task=replace_task(self.task, **(task or {})),
            privacy=dataclasses.replace(self.privacy, **(privacy or {})),
            aggregation=dataclasses.replace(self.aggregation, **(aggregation or {})),
        ).validate()


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file ([run], [task], [privacy], [aggregation])."""
    return StudyConfig.from_dict(load_tables(path, TABLES), str(path))


def dump_study(config: StudyConfig) -> str:
    return tomli_w.dumps(config.to_dict())
