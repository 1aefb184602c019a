"""Task names (``--task``, ``task.name``) to Task classes."""

from __future__ import annotations

from pathlib import Path

import torch

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import SiteData, load_site_data
from medgan_core.errors import ConfigError
from medgan_core.tasks.base import Task


def _registry() -> dict[str, type[Task]]:
    from medgan_core.tasks.conditional import ConditionalSynthesisTask
    from medgan_core.tasks.cycle import CycleTask
    from medgan_core.tasks.denoise import DenoiseTask
    from medgan_core.tasks.recon import ReconTask
    from medgan_core.tasks.superres import SuperResTask
    from medgan_core.tasks.synthesis import SynthesisTask
    from medgan_core.tasks.translate import TranslateTask

    return {cls.name: cls for cls in (SynthesisTask, ConditionalSynthesisTask, DenoiseTask, SuperResTask, ReconTask,
                                        TranslateTask, CycleTask)}


def task_names() -> list[str]:
    return sorted(_registry())


def task_class(name: str) -> type[Task]:
    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(task_names())}") from None


def build_task(config: TaskConfig, device: torch.device | str = "cpu") -> Task:
    return task_class(config.name)(config, device)


def load_task_data(data_path: str | Path, config: TaskConfig) -> SiteData:
    """A site's data in the form its task needs (single images, or degraded/original pairs)."""
    kind = task_class(config.name).data_kind_for(config)
    return load_site_data(data_path, config, kind)
