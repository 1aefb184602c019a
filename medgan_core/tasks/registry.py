"""Task names (``--task``, ``task.name``) to Task classes."""

from __future__ import annotations

import torch

from medgan_core.config import TaskConfig
from medgan_core.errors import ConfigError
from medgan_core.tasks.base import Task


def _registry() -> dict[str, type[Task]]:
    from medgan_core.tasks.synthesis import SynthesisTask

    return {cls.name: cls for cls in (SynthesisTask,)}


def task_names() -> list[str]:
    return sorted(_registry())


def build_task(config: TaskConfig, device: torch.device | str = "cpu") -> Task:
    try:
        cls = _registry()[config.name]
    except KeyError:
        raise ConfigError(f"unknown task {config.name!r}; choose one of {', '.join(task_names())}") from None
    return cls(config, device)
