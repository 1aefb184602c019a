"""Low-dose CT denoising: a conditional GAN (residual U-Net + PatchGAN) with an L1 term.

Both networks read real images (the generator reads the low-dose input), so under DP both
train with DP-SGD on the same Poisson batch: two releases per step, both accounted.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import LOW_DOSE_PAIRS, SiteData
from medgan_core.metrics.image_quality import psnr_ssim
from medgan_core.models.unet import PatchDiscriminator, ResidualUNet
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, make_private, poisson_batch, privacy_generator
from medgan_core.runtime import seeded
from medgan_core.tasks.base import Task, close_private, set_hooks

L1_WEIGHT = 100.0  # pix2pix: fidelity first, the adversarial term sharpens
EVAL_BATCH = 64


class DenoiseTask(Task):
    name = "denoise"
    private_groups = ("generator", "discriminator")
    data_kind = LOW_DOSE_PAIRS
    preview_columns = 3
    preview_count = 4

    def __init__(self, config: TaskConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        with seeded(config.seed):
            self.generator = ResidualUNet(config.width)
            self.discriminator = PatchDiscriminator(config.width)
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
        assert data.train_input is not None, "denoise needs paired low-dose inputs"
        cfg = self.config
        rng = torch.Generator().manual_seed(seed)
        opt_g: torch.optim.Optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
        opt_d: torch.optim.Optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_discriminator, betas=(0.5, 0.999))
        generator: nn.Module = self.generator
        discriminator: nn.Module = self.discriminator
        sampler = rng
        if dp is not None:
            sampler = privacy_generator(dp, seed + 1)
            generator, opt_g = make_private(self.generator, opt_g, dp, generator=sampler)
            discriminator, opt_d = make_private(self.discriminator, opt_d, dp, generator=sampler)
        totals = {"loss-d": 0.0, "loss-g": 0.0, "loss-l1": 0.0}
        updates = 0
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                generator.train()
                discriminator.train()
                for _ in range(steps):
                    if dp is not None:
                        idx = poisson_batch(data.num_train, dp.sample_rate, sampler)
                        if accountant is not None:
                            for _group in self.private_groups:  # one release per private network
                                accountant.step(dp.noise_multiplier, dp.sample_rate)
                        if idx.numel() == 0:
                            continue
                    else:
                        idx = torch.randint(0, data.num_train, (min(cfg.batch_size, data.num_train),), generator=rng)
                    low = data.train_input[idx].to(self.device)
                    full = data.train[idx].to(self.device)

                    # Discriminator: each example's real pair and fake pair share one
                    # per-sample gradient (one backward), so one patient counts once.
                    set_hooks(generator, enabled=False)
                    with torch.no_grad():
                        fake = generator(low)
                    set_hooks(generator, enabled=True)
                    loss_d = (F.softplus(-discriminator(low, full)) + F.softplus(discriminator(low, fake))).mean()
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()

                    # Generator: adversarial + L1 to the full-dose image, per-sample clipped.
                    set_hooks(discriminator, enabled=False)
                    fake = generator(low)
                    loss_adv = F.softplus(-discriminator(low, fake)).mean()
                    loss_l1 = (fake - full).abs().mean()
                    loss_g = loss_adv + L1_WEIGHT * loss_l1
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    set_hooks(discriminator, enabled=True)

                    updates += 1
                    totals["loss-d"] += loss_d.item()
                    totals["loss-g"] += loss_adv.item()
                    totals["loss-l1"] += loss_l1.item()
        finally:
            close_private(generator, discriminator)
        return {k: v / max(updates, 1) for k, v in totals.items()}

    @torch.no_grad()
    def denoise(self, images: torch.Tensor) -> torch.Tensor:
        self.generator.eval()
        out = [self.generator(images[i : i + EVAL_BATCH].to(self.device)).cpu() for i in range(0, len(images), EVAL_BATCH)]
        return torch.cat(out).clamp(-1, 1)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        assert data.test_input is not None
        output = self.denoise(data.test_input)
        psnr, ssim = psnr_ssim(output, data.test)
        psnr_in, ssim_in = psnr_ssim(data.test_input, data.test)
        hu_per_unit = (self.config.window_high - self.config.window_low) / 2.0
        return {
            "psnr": psnr,
            "ssim": ssim,
            "mae-hu": float((output - data.test).abs().mean()) * hu_per_unit,
            "psnr-input": psnr_in,
            "ssim-input": ssim_in,
        }

    def preview(self, n: int) -> torch.Tensor:
        """Rows of input | output | target on phantom slices the server makes itself (no patient data)."""
        from medgan_core.data.simulate import phantom_ct_pairs

        low, full = phantom_ct_pairs(n, self.config, seed=self.config.seed)
        out = self.denoise(low)
        return torch.stack([low, out, full], dim=1).reshape(-1, 1, *low.shape[-2:])
