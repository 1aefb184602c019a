"""Unconditional synthesis for data augmentation: a DCGAN on 2D slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import SiteData
from medgan_core.metrics.distribution import intensity_distance, sliced_wasserstein
from medgan_core.models.dcgan import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights
from medgan_core.runtime import seeded
from medgan_core.tasks.base import Task


class SynthesisTask(Task):
    """Non-saturating GAN loss, Adam(0.5, 0.999) as in DCGAN.

    Only the discriminator reads real images; the generator sees them only through the
    discriminator's gradients.
    """

    name = "synthesis"

    def __init__(self, config: TaskConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        with seeded(config.seed):
            self.generator = DCGANGenerator(config.z_dim, config.image_size, config.width)
            self.discriminator = DCGANDiscriminator(config.image_size, config.width)
            self.generator.apply(init_dcgan_weights)
            self.discriminator.apply(init_dcgan_weights)
        self.generator.to(self.device)
        self.discriminator.to(self.device)

    @property
    def groups(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def train(self, data: SiteData, steps: int, seed: int) -> dict[str, float]:
        cfg = self.config
        rng = torch.Generator().manual_seed(seed)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_discriminator, betas=(0.5, 0.999))
        self.generator.train()
        self.discriminator.train()
        batch = min(cfg.batch_size, data.num_train)
        totals = {"loss-d": 0.0, "loss-g": 0.0, "d-real": 0.0, "d-fake": 0.0}
        for _ in range(steps):
            idx = torch.randint(0, data.num_train, (batch,), generator=rng)
            real = data.train[idx].to(self.device)
            z = torch.randn(batch, cfg.z_dim, generator=rng).to(self.device)
            fake = self.generator(z)

            logits_real = self.discriminator(real)
            logits_fake = self.discriminator(fake.detach())
            loss_d = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            loss_g = F.softplus(-self.discriminator(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()

            totals["loss-d"] += loss_d.item()
            totals["loss-g"] += loss_g.item()
            totals["d-real"] += torch.sigmoid(logits_real).mean().item()
            totals["d-fake"] += torch.sigmoid(logits_fake).mean().item()
        return {k: v / steps for k, v in totals.items()}

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> torch.Tensor:
        self.generator.eval()
        z = torch.randn(n, self.config.z_dim, generator=torch.Generator().manual_seed(seed))
        return self.generator(z.to(self.device)).cpu()

    def evaluate(self, data: SiteData) -> dict[str, float]:
        fake = self.sample(self.config.eval_samples, seed=self.config.seed + 7919)
        return {
            "swd": sliced_wasserstein(fake, data.test, seed=self.config.seed),
            "intensity-w1": intensity_distance(fake, data.test),
        }

    def preview(self, n: int) -> torch.Tensor:
        return self.sample(n, seed=self.config.seed + 104729)
