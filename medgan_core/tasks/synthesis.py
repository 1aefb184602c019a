"""Unconditional synthesis for data augmentation: a DCGAN on 2D slices."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import SiteData
from medgan_core.metrics.distribution import intensity_distance, sliced_wasserstein
from medgan_core.models.dcgan import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, make_private, poisson_batch, privacy_generator
from medgan_core.runtime import seeded
from medgan_core.tasks.base import Task, close_private, set_hooks


class SynthesisTask(Task):
    """Non-saturating GAN loss, Adam(0.5, 0.999) as in DCGAN.

    Only the discriminator reads real images; the generator sees them only through the
    discriminator's gradients.
    """

    name = "synthesis"
    private_groups = ("discriminator",)

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

    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        cfg = self.config
        rng = torch.Generator().manual_seed(seed)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_discriminator, betas=(0.5, 0.999))
        discriminator: nn.Module = self.discriminator
        sampler = rng
        if dp is not None:
            sampler = privacy_generator(dp, seed + 1)  # secret: batches and noise
            discriminator, opt_d = make_private(self.discriminator, opt_d, dp, generator=sampler)
        try:
            with warnings.catch_warnings():
                # Opacus' hooks on the first layer fire for inputs without grad: harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return self._train_loop(data, steps, rng, sampler, discriminator, opt_d, opt_g, dp, accountant)
        finally:
            close_private(discriminator)

    def _train_loop(
        self,
        data: SiteData,
        steps: int,
        rng: torch.Generator,
        sampler: torch.Generator,
        discriminator: nn.Module,
        opt_d: torch.optim.Optimizer,
        opt_g: torch.optim.Optimizer,
        dp: DPSettings | None,
        accountant: SiteAccountant | None,
    ) -> dict[str, float]:
        cfg = self.config
        self.generator.train()
        discriminator.train()
        batch = min(cfg.batch_size, data.num_train)
        totals = {"loss-d": 0.0, "loss-g": 0.0, "d-real": 0.0, "d-fake": 0.0}
        updates = 0
        for _ in range(steps):
            if dp is not None:
                idx = poisson_batch(data.num_train, dp.sample_rate, sampler)
                if accountant is not None:
                    accountant.step(dp.noise_multiplier, dp.sample_rate)
                if idx.numel() == 0:
                    continue  # an empty Poisson batch: the step is accounted, nothing to learn
            else:
                idx = torch.randint(0, data.num_train, (batch,), generator=rng)
            real = data.train[idx].to(self.device)
            z = torch.randn(real.shape[0], cfg.z_dim, generator=rng).to(self.device)
            fake = self.generator(z)

            # Discriminator: the only module that sees real images. Real and fake halves
            # are separate backward passes, so under DP each real image is one clipped
            # per-sample gradient and generated images cost no privacy.
            opt_d.zero_grad(set_to_none=True)
            logits_real = discriminator(real)
            loss_real = F.softplus(-logits_real).mean()
            loss_real.backward()
            logits_fake = discriminator(fake.detach())
            loss_fake = F.softplus(logits_fake).mean()
            loss_fake.backward()
            opt_d.step()

            # Generator: learns only through D's judgement of generated images
            # (post-processing of the private D), so D's per-sample hooks are off here.
            set_hooks(discriminator, enabled=False)
            loss_g = F.softplus(-discriminator(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            set_hooks(discriminator, enabled=True)

            updates += 1
            totals["loss-d"] += (loss_real + loss_fake).item()
            totals["loss-g"] += loss_g.item()
            totals["d-real"] += torch.sigmoid(logits_real).mean().item()
            totals["d-fake"] += torch.sigmoid(logits_fake).mean().item()
        return {k: v / max(updates, 1) for k, v in totals.items()}

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

