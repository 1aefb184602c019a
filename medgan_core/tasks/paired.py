"""Paired image-to-image GANs (pix2pix style): a residual U-Net generator and a
conditional PatchGAN discriminator, adversarial + L1 loss.

Denoising and super-resolution share this: the generator maps a degraded image (low
dose; bicubic-interpolated low resolution) to the original on the same grid, learning
only the correction. Both networks read real images (the generator reads the degraded
input), so under DP both train with DP-SGD on the same Poisson batch: per step one
release of their joint mechanism (noise multiplier σ/√2), accounted once.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.data.augment import dihedral_average, dihedral_pairs
from medgan_core.data.dataset import SiteData
from medgan_core.metrics.image_quality import psnr_ssim, ssim_per_image
from medgan_core.models.unet import PatchDiscriminator, ResidualUNet
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings
from medgan_core.tasks.base import GANTask, set_hooks

EVAL_BATCH = 64


class PairedImageTask(GANTask):
    """Degraded input -> original, evaluated against the original on held-out pairs."""

    private_groups = ("generator", "discriminator")
    train_metrics = frozenset({"loss-d", "loss-g", "loss-l1", "loss-ssim"})
    eval_metrics = frozenset({"mae-hu", "psnr", "psnr-input", "ssim", "ssim-input"})
    headline_metric = "psnr"
    preview_columns = 3
    preview_count = 4
    #: Channels of the degraded input (the discriminator sees them beside the candidate).
    input_channels: ClassVar[int] = 1
    #: Train on random flips/quarter turns of each pair (``dihedral_pairs``): only where the
    #: input stays a valid input when turned (not k-space, whose mask is not an image).
    augment: ClassVar[bool] = False
    #: Restore by averaging the model over the 8 flips/quarter turns (``dihedral_average``);
    #: for a model trained on turned pairs, 8x the inference cost for a cleaner estimate.
    self_ensemble: ClassVar[bool] = False
    target_loss_keys: ClassVar[frozenset[str]] = frozenset({"l1-weight", "ssim-weight"})

    def build_networks(self) -> tuple[nn.Module, PatchDiscriminator]:
        return self.build_generator(), PatchDiscriminator(self.config.width, channels=self.input_channels + 1)

    def build_generator(self) -> nn.Module:
        return ResidualUNet(self.config.width)

    def input_image(self, inputs: torch.Tensor) -> torch.Tensor:
        """The degraded input as an image (n, 1, H, W): the classical baseline the output is
        compared with (low-dose image, bicubic interpolation, zero-filled reconstruction, the
        source modality)."""
        return inputs

    def extra_metrics(self, output: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
        """Task-specific held-out metrics beyond PSNR/SSIM (and MAE in HU for CT)."""
        return {}

    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        assert data.train_input is not None, f"{self.name} needs paired inputs"
        totals = {"loss-d": 0.0, "loss-g": 0.0, "loss-l1": 0.0}
        if self.config.ssim_weight > 0:
            totals["loss-ssim"] = 0.0
        updates = 0
        with self.training_setup(dp, seed) as s:
            for _ in range(steps):
                idx = self.next_batch(data, s, dp, accountant)
                if idx is None:
                    continue
                low, full = data.train_input[idx], data.train[idx]
                if self.augment:
                    low, full = dihedral_pairs(low, full, generator=s.rng)
                low, full = low.to(self.device), full.to(self.device)

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

                # Generator: adversarial + L1 (+ 1 - SSIM) to the full-dose image, per-sample clipped.
                set_hooks(s.discriminator, enabled=False)
                fake = s.generator(low)
                loss_adv = F.softplus(-s.discriminator(low, fake)).mean()
                loss_l1 = (fake - full).abs().mean()
                loss_g = loss_adv + self.config.l1_weight * loss_l1
                if self.config.ssim_weight > 0:
                    loss_ssim = (1 - ssim_per_image(fake, full)).mean()
                    loss_g = loss_g + self.config.ssim_weight * loss_ssim
                    totals["loss-ssim"] += loss_ssim.item()
                s.opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                s.opt_g.step()
                set_hooks(s.discriminator, enabled=True)

                updates += 1
                totals["loss-d"] += loss_d.item()
                totals["loss-g"] += loss_adv.item()
                totals["loss-l1"] += loss_l1.item()
        return {k: v / max(updates, 1) for k, v in totals.items()}

    @torch.no_grad()
    def restore(self, images: torch.Tensor) -> torch.Tensor:
        """The generator on any number of degraded images of any size divisible by 4."""
        self.generator.eval()

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.generator(batch[i : i + EVAL_BATCH].to(self.device)).cpu()
                              for i in range(0, len(batch), EVAL_BATCH)])

        return (dihedral_average(run, images) if self.self_ensemble else run(images)).clamp(-1, 1)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        assert data.test_input is not None
        output = self.restore(data.test_input)
        baseline = self.input_image(data.test_input)
        psnr, ssim = psnr_ssim(output, data.test)
        psnr_in, ssim_in = psnr_ssim(baseline, data.test)
        metrics = {"psnr": psnr, "ssim": ssim, "psnr-input": psnr_in, "ssim-input": ssim_in}
        if self.config.modality == "CT":
            hu_per_unit = (self.config.window_high - self.config.window_low) / 2.0
            metrics["mae-hu"] = float((output - data.test).abs().mean()) * hu_per_unit
        return {**metrics, **self.extra_metrics(output, data.test, baseline)}

    @abstractmethod
    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (degraded, original) pairs the coordinator makes itself (no patient data)."""

    def preview(self, n: int) -> torch.Tensor:
        """Rows of input | output | target on the coordinator's own phantom slices."""
        degraded, original = self.preview_pairs(n)
        out = self.restore(degraded)
        rows = [self.input_image(degraded).clamp(-1, 1), out, original.clamp(-1, 1)]
        return torch.stack(rows, dim=1).reshape(-1, 1, *degraded.shape[-2:])
