"""Task names (``--task``, ``task.name``) to Task classes, and task configs built from keys.

The built-in tasks are registered in ``BUILT_IN`` below, one line each. A task written
outside this package registers with one line in its own package's metadata, an entry
point in the ``medgan.tasks`` group (``toy = "my_tasks.toy:ToyTask"``), the way pytest
and Flower find their plugins: nothing here changes, and the name is known in every
process that can import the package, Ray's simulation workers included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from medgan_core.config import TaskConfig, TaskParams, build_table, config_key
from medgan_core.data.dataset import SiteData, load_site_data, load_validation_data
from medgan_core.errors import ConfigError
from medgan_core.plugins import load_registered, registered
from medgan_core.tasks.base import Task

#: Built-in tasks: name -> "module:Class" (imported when first asked for).
BUILT_IN = {
    "synthesis": "medgan_core.tasks.synthesis:SynthesisTask",
    "conditional": "medgan_core.tasks.conditional:ConditionalSynthesisTask",
    "denoise": "medgan_core.tasks.denoise:DenoiseTask",
    "superres": "medgan_core.tasks.superres:SuperResTask",
    "recon": "medgan_core.tasks.recon:ReconTask",
    "translate": "medgan_core.tasks.translate:TranslateTask",
    "cycle": "medgan_core.tasks.cycle:CycleTask",
}
ENTRY_POINT_GROUP = "medgan.tasks"
SHARED_KEYS = tuple(config_key(f.name) for f in dataclasses.fields(TaskConfig) if f.name != "params")


def _targets() -> dict[str, str]:
    return registered(ENTRY_POINT_GROUP, BUILT_IN, "task")


def task_names() -> list[str]:
    return sorted(_targets())


def task_class(name: str) -> type[Task]:
    targets = _targets()
    if name not in targets:
        raise ConfigError(f"task.name = {name!r} is not a known task; choose one of {', '.join(task_names())}")
    return load_registered("task", name, targets[name], Task)


def task_config(source: str = "task settings", **values: Any) -> TaskConfig:
    """A validated TaskConfig from Python field names (``task_config(name="superres", scale=4)``)."""
    return task_config_from_items({config_key(k): v for k, v in values.items()}, source)


#: Keys a task had and no longer has, and what took their place (a study written for an older
#: version is refused with the reason, not only "no such key").
RETIRED_KEYS = {
    ("cycle", "crop-size"): "cycle now trains on task.image-size patches at task.spacing, as the other "
                            "image-to-image tasks, and harmonises whole slices tile by tile",
}


def task_config_from_items(items: Mapping[str, Any], source: str = "config") -> TaskConfig:
    """The ``[task]`` table (config keys), shared and task-specific keys together, validated:
    the shared keys by ``TaskConfig``, the rest by the task's own ``Params``."""
    name = items.get("name", TaskConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"{source}: task.name = {name!r}; expected the name of a task")
    cls = task_class(name)
    own = {key: value for key, value in items.items() if key not in SHARED_KEYS}
    param_keys = _param_keys(cls)
    unknown = sorted(set(own) - param_keys)
    retired = [key for key in unknown if (name, key) in RETIRED_KEYS]
    if retired:
        raise ConfigError(f"{source}: task.{retired[0]} is no longer a key of task {name!r}: "
                          f"{RETIRED_KEYS[(name, retired[0])]}; remove it")
    if unknown:
        owners = [other for other in task_names() if unknown[0] in _param_keys(task_class(other))]
        belongs = f" (a key of task {' and '.join(map(repr, owners))})" if owners else ""
        raise ConfigError(f"{source}: task {name!r} has no key task.{unknown[0]}{belongs}; its keys are "
                          f"{', '.join(sorted((*SHARED_KEYS, *param_keys)))}")
    shared = build_table(TaskConfig, {k: v for k, v in items.items() if k in SHARED_KEYS}, "task", source)
    config = dataclasses.replace(shared, params=build_table(cls.Params, own, "task", source))
    validate_task_config(config)
    return config


def _param_keys(cls: type[Task]) -> set[str]:
    return {config_key(f.name) for f in dataclasses.fields(cls.Params)}


def validate_task_config(config: TaskConfig) -> None:
    """Shared keys, the task's modality and its own keys (``Params`` of the named task)."""
    cls = task_class(config.name)
    if not isinstance(config.params, cls.Params):
        raise ConfigError(f"task {config.name!r} takes {cls.Params.__name__}, not {type(config.params).__name__}")
    if cls.modalities and config.modality not in cls.modalities:
        raise ConfigError(f"task.name = {config.name!r} needs task.modality = {' or '.join(map(repr, cls.modalities))}"
                          f" ({cls.modality_reason})")
    config.validate()


def replace_task(config: TaskConfig, **changes: Any) -> TaskConfig:
    """``config`` with some fields changed (Python names, shared or the task's own), validated.
    A new ``name`` starts from that task's own defaults."""
    items = config.to_items() if changes.get("name", config.name) == config.name else {
        key: value for key, value in config.to_items().items() if key in SHARED_KEYS}
    return task_config_from_items({**items, **{config_key(k): v for k, v in changes.items()}}, "task settings")


def default_params(name: str) -> TaskParams:
    return task_class(name).Params()


def build_task(config: TaskConfig, device: torch.device | str = "cpu") -> Task:
    return task_class(config.name)(config, device)


def load_task_data(data_path: str | Path, config: TaskConfig, cache_dir: Path | None = None) -> SiteData:
    """A site's data in the form its task reads (``Task.data_spec``); clinical-geometry slices
    are kept memory-mapped in ``cache_dir`` when given."""
    return load_site_data(data_path, config, task_class(config.name).data_spec(config), cache_dir)


def load_task_validation(data_path: str | Path, config: TaskConfig, cache_dir: Path | None = None) -> SiteData | None:
    """A site's validation subjects in the form its task reads, as the held-out split (None:
    the site has none); what a fine-tune chooses its model by."""
    return load_validation_data(data_path, config, task_class(config.name).data_spec(config), cache_dir)


def geometry_words(config: TaskConfig) -> str:
    """How a task's images were prepared, in words (reports, model provenance)."""
    size = f"{config.image_size}×{config.image_size}"
    if config.name == "recon":
        pixels = f"at {config.spacing:g} mm pixels" if config.spacing > 0 else "on the acquired matrix"
        return f"whole slices {pixels} from the central k-space, trained on strips of {config.image_size} whole rows"
    if getattr(task_class(config.name), "clinical", False):
        pixels = f"{config.spacing:g} mm pixels" if config.spacing > 0 else "each series' own pixels"
        context = int(getattr(config.params, "context_slices", 0))
        neighbours = (f", each slice read with {context} neighbouring slice{'s' if context > 1 else ''} on each "
                      "side (2.5D)") if context else ""
        return f"whole slices at {pixels} over the whole CT range, trained on {size} patches{neighbours}"
    if config.spacing > 0:
        return f"the central {size} at {config.spacing:g} mm pixels"
    return f"resized to {size}"
