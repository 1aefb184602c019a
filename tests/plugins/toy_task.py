"""A task written outside MedGAN-FL, in one file: the proof that adding a task needs its file
and one registration line (an entry point ``toy = "toy_task:ToyTask"`` in the group
``medgan.tasks``). A tiny fully connected GAN on whole slices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.config import TaskConfig, TaskParams
from medgan_core.data.dataset import SiteData
from medgan_core.errors import ConfigError
from medgan_core.tasks.base import GANTask, TrainingSetup


@dataclass(frozen=True)
class ToyParams(TaskParams):
    hidden: int = 16  # width of the one hidden layer of each network

    def validate(self, task: TaskConfig) -> None:
        if not 1 <= self.hidden <= 256:
            raise ConfigError(f"task.hidden = {self.hidden}; it must lie in [1, 256]")


class ToyTask(GANTask):
    name = "toy"
    Params = ToyParams
    params: ToyParams
    private_groups = ("discriminator",)
    train_metrics = frozenset({"loss-d", "loss-g"})
    eval_metrics = frozenset({"mean-gap"})
    headline_metric = "mean-gap"
    latent = 8

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        pixels, hidden = self.config.image_size ** 2, self.params.hidden
        generator = nn.Sequential(nn.Linear(self.latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Tanh())
        discriminator = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        return generator, discriminator

    def _fake(self, generator: nn.Module, n: int, rng: torch.Generator) -> torch.Tensor:
        size = self.config.image_size
        return generator(torch.randn(n, self.latent, generator=rng).to(self.device)).view(n, 1, size, size)

    def train_step(self, s: TrainingSetup, data: SiteData, pool: str, idx: torch.Tensor) -> dict[str, float]:
        real = data.train[idx].to(self.device)
        fake = self._fake(s.generator, len(idx), s.rng)
        s.opt_d.zero_grad(set_to_none=True)
        loss_real = F.softplus(-s.discriminator(real)).mean()
        loss_real.backward()
        loss_fake = F.softplus(s.discriminator(fake.detach())).mean()
        loss_fake.backward()
        s.opt_d.step()
        with s.learning_through(s.discriminator):
            loss_g = F.softplus(-s.discriminator(fake)).mean()
            s.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            s.opt_g.step()
        return {"loss-d": (loss_real + loss_fake).item(), "loss-g": loss_g.item()}

    @torch.no_grad()
    def evaluate(self, data: SiteData) -> dict[str, float]:
        fake = self._fake(self.generator, 64, torch.Generator().manual_seed(self.config.seed))
        return {"mean-gap": float((fake.mean() - data.test.mean()).abs())}

    @torch.no_grad()
    def preview(self, n: int) -> torch.Tensor:
        return self._fake(self.generator, n, torch.Generator().manual_seed(self.config.seed + 1)).cpu()
