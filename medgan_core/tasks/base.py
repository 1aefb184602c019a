"""The Task contract: everything a site does for one imaging job, as plain Python.

Clients, the server and tests drive tasks only through this interface, so a task runs
the same in a federation, in a notebook, or on one machine.
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import SINGLE, SiteData
from medgan_core.models.weights import expected_shapes, group_arrays, load_group_arrays
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, make_private, poisson_batch, privacy_generator
from medgan_core.runtime import seeded


class Task(ABC):
    """Builds its networks from a TaskConfig; trains and evaluates on a site's data."""

    name: ClassVar[str]
    #: Parameter groups that read real images and so must train with DP-SGD.
    private_groups: ClassVar[tuple[str, ...]]
    #: What the task reads from a site (see ``medgan_core.data.dataset``).
    data_kind: ClassVar[str] = SINGLE
    #: Columns of the per-round sample grid (3: input | output | target).
    preview_columns: ClassVar[int] = 4
    #: How many previews (images, or input/output/target rows) a grid shows.
    preview_count: ClassVar[int] = 16

    @property
    def dp_releases_per_step(self) -> int:
        """Private networks updated per step on the same batch: each is one DP release."""
        return len(self.private_groups)

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
        """Images in [-1, 1], shape (k, 1, H, W), for sample grids: ``n`` outputs, or
        ``n`` rows of ``preview_columns`` for image-to-image tasks. Never patient data."""

    @property
    def private_modules(self) -> dict[str, nn.Module]:
        return {name: self.groups[name] for name in self.private_groups}

    def get_weights(self) -> dict[str, np.ndarray]:
        return group_arrays(self.groups)

    def set_weights(self, arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
        load_group_arrays(self.groups, arrays, source)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.groups)


def set_hooks(module: nn.Module, enabled: bool) -> None:
    """Switch Opacus' per-sample gradient hooks (no-op on a plain module)."""
    if isinstance(module, GradSampleModule):
        module.enable_hooks() if enabled else module.disable_hooks()


def close_private(*modules: nn.Module) -> None:
    """Remove Opacus hooks so the plain modules can be wrapped again next round."""
    for module in modules:
        if isinstance(module, GradSampleModule):
            module._close()


@dataclass
class TrainingSetup:
    """What one local round of a GAN task trains with: the (possibly private) networks,
    their optimisers, and the generator that draws batches (secret under DP)."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sampler: torch.Generator
    rng: torch.Generator


class GANTask(Task):
    """Shared plumbing of generator/discriminator tasks: Adam(0.5, 0.999) as in DCGAN and
    pix2pix, DP-SGD wrapping of ``private_groups``, Poisson or uniform batches."""

    generator: nn.Module
    discriminator: nn.Module

    def __init__(self, config: TaskConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        with seeded(config.seed):  # same seed, same initial model, at every site and the server
            generator, discriminator = self.build_networks()
        self.generator = generator.to(self.device)
        self.discriminator = discriminator.to(self.device)

    @abstractmethod
    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        """(generator, discriminator), freshly initialised; called under the task's seed."""

    @property
    def groups(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    @contextlib.contextmanager
    def training_setup(self, dp: DPSettings | None, seed: int) -> Iterator[TrainingSetup]:
        cfg = self.config
        rng = torch.Generator().manual_seed(seed)
        setup = TrainingSetup(
            self.generator,
            self.discriminator,
            torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_discriminator, betas=(0.5, 0.999)),
            rng,
            rng,
        )
        if dp is not None:
            setup.sampler = privacy_generator(dp, seed + 1)  # secret: batches and noise
            for group in self.private_groups:
                optimizer = setup.opt_g if group == "generator" else setup.opt_d
                module, private = make_private(self.groups[group], optimizer, dp, generator=setup.sampler)
                if group == "generator":
                    setup.generator, setup.opt_g = module, private
                else:
                    setup.discriminator, setup.opt_d = module, private
        try:
            with warnings.catch_warnings():
                # Opacus' hooks on a first layer fire for inputs without grad: harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                setup.generator.train()
                setup.discriminator.train()
                yield setup
        finally:
            close_private(setup.generator, setup.discriminator)

    def next_batch(
        self, data: SiteData, setup: TrainingSetup, dp: DPSettings | None, accountant: SiteAccountant | None
    ) -> torch.Tensor | None:
        """Indices of the next batch; under DP a Poisson batch, every release accounted
        (None for an empty batch: the step is spent, nothing is learned)."""
        if dp is None:
            size = min(self.config.batch_size, data.num_train)
            return torch.randint(0, data.num_train, (size,), generator=setup.rng)
        idx = poisson_batch(data.num_train, dp.sample_rate, setup.sampler)
        if accountant is not None:
            for _ in range(self.dp_releases_per_step):
                accountant.step(dp.noise_multiplier, dp.sample_rate)
        return idx if idx.numel() else None
