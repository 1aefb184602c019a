"""The Task contract: everything a site does for one imaging job, as plain Python.

Clients, the server and tests drive tasks only through this interface, so a task runs
the same in a federation, in a notebook, or on one machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import SiteData
from medgan_core.models.weights import expected_shapes, group_arrays, load_group_arrays
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings


class Task(ABC):
    """Builds its networks from a TaskConfig; trains and evaluates on a site's data."""

    name: ClassVar[str]
    #: Parameter groups that read real images and so must train with DP-SGD.
    private_groups: ClassVar[tuple[str, ...]]

    def __init__(self, config: TaskConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    @property
    @abstractmethod
    def groups(self) -> dict[str, nn.Module]:
        """Named parameter groups, e.g. ``{"generator": G, "discriminator": D}``."""

    @abstractmethod
    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        """Run ``steps`` local optimisation steps; return scalar training metrics.

        With ``dp``, the ``private_groups`` train with DP-SGD on Poisson-sampled batches
        and every step is recorded in ``accountant``.
        """

    @abstractmethod
    def evaluate(self, data: SiteData) -> dict[str, float]:
        """Scalar quality metrics on the site's held-out split."""

    @abstractmethod
    def preview(self, n: int) -> torch.Tensor:
        """``n`` model outputs in [-1, 1], shape (n, 1, H, W), for sample grids."""

    @property
    def private_modules(self) -> dict[str, nn.Module]:
        return {name: self.groups[name] for name in self.private_groups}

    def get_weights(self) -> dict[str, np.ndarray]:
        return group_arrays(self.groups)

    def set_weights(self, arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
        load_group_arrays(self.groups, arrays, source)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.groups)
