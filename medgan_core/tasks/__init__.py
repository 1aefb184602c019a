"""Imaging GAN tasks behind one interface, found by name."""

from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task, task_names

__all__ = ["Task", "build_task", "task_names"]
