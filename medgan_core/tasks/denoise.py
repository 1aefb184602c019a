"""Low-dose CT denoising: a conditional GAN (residual U-Net + PatchGAN) with an L1 term.

Both networks read real images (the generator reads the low-dose input), so under DP both
train with DP-SGD on the same Poisson batch: two releases per step, both accounted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medgan_core.data.dataset import LOW_DOSE_PAIRS, SiteData
from medgan_core.metrics.image_quality import psnr_ssim
from medgan_core.models.unet import PatchDiscriminator, ResidualUNet
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings
from medgan_core.tasks.base import GANTask, set_hooks

L1_WEIGHT = 100.0  # pix2pix: fidelity first, the adversarial term sharpens
EVAL_BATCH = 64


class DenoiseTask(GANTask):
    name = "denoise"
    private_groups = ("generator", "discriminator")
    data_kind = LOW_DOSE_PAIRS
    preview_columns = 3
    preview_count = 4

    def build_networks(self) -> tuple[ResidualUNet, PatchDiscriminator]:
        return ResidualUNet(self.config.width), PatchDiscriminator(self.config.width)

    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        assert data.train_input is not None, "denoise needs paired low-dose inputs"
        totals = {"loss-d": 0.0, "loss-g": 0.0, "loss-l1": 0.0}
        updates = 0
        with self.training_setup(dp, seed) as s:
            for _ in range(steps):
                idx = self.next_batch(data, s, dp, accountant)
                if idx is None:
                    continue
                low = data.train_input[idx].to(self.device)
                full = data.train[idx].to(self.device)

                # Discriminator: each example's real pair and fake pair share one per-sample
                # gradient (one backward), so one patient counts once.
                set_hooks(s.generator, enabled=False)
                with torch.no_grad():
                    fake = s.generator(low)
                set_hooks(s.generator, enabled=True)
                loss_d = (F.softplus(-s.discriminator(low, full)) + F.softplus(s.discriminator(low, fake))).mean()
                s.opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                s.opt_d.step()

                # Generator: adversarial + L1 to the full-dose image, per-sample clipped.
                set_hooks(s.discriminator, enabled=False)
                fake = s.generator(low)
                loss_adv = F.softplus(-s.discriminator(low, fake)).mean()
                loss_l1 = (fake - full).abs().mean()
                s.opt_g.zero_grad(set_to_none=True)
                (loss_adv + L1_WEIGHT * loss_l1).backward()
                s.opt_g.step()
                set_hooks(s.discriminator, enabled=True)

                updates += 1
                totals["loss-d"] += loss_d.item()
                totals["loss-g"] += loss_adv.item()
                totals["loss-l1"] += loss_l1.item()
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
