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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.data.augment import dihedral_average, dihedral_pairs
from medgan_core.data.dataset import SiteData
from medgan_core.metrics.image_quality import psnr_ssim, ssim_per_image
from medgan_core.models.unet import PatchDiscriminator, ResidualUNet
from medgan_core.config import TaskConfig, TaskParams
from medgan_core.errors import ConfigError
from medgan_core.tasks.base import GANTask, TrainingSetup

EVAL_BATCH = 64


@dataclass(frozen=True)
class PairedParams(TaskParams):
    """The loss to the paired target beside the adversarial one."""

    l1_weight: float = 100.0  # weight of the L1 fidelity term
    ssim_weight: float = 0.0  # weight of a (1 - SSIM) term (0: none)

    def validate(self, task: TaskConfig) -> None:
        if self.l1_weight <= 0:
            raise ConfigError(f"task.l1-weight = {self.l1_weight}; it must be a positive number")
        if self.ssim_weight < 0:
            raise ConfigError(f"task.ssim-weight = {self.ssim_weight}; it must be 0 (off) or a positive number")


class PairedImageTask(GANTask):
    """Degraded input -> original, evaluated against the original on held-out pairs."""

    Params: ClassVar[type[TaskParams]] = PairedParams
    params: PairedParams
    private_groups = ("generator", "discriminator")
    train_metrics = frozenset({"loss-d", "loss-g", "loss-l1", "loss-ssim"})
    eval_metrics = frozenset({"mae-hu", "psnr", "psnr-input", "ssim", "ssim-input"})
    headline_metric = "psnr"
    #: The target and the input, in words, for the report (``metrics_note``).
    target_words: ClassVar[str] = "the target"
    input_words: ClassVar[str] = "the input"

    @classmethod
    def note(cls) -> str:
        return (f"`psnr`/`ssim` of the output against {cls.target_words}; `-input`: the same for "
                f"{cls.input_words}, the classical baseline; `mae-hu` the mean absolute error in HU within "
                "the window (CT targets); `nmse` the normalised squared error (MR reconstruction).")
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

    def train_step(self, s: TrainingSetup, data: SiteData, pool: str, idx: torch.Tensor) -> dict[str, float]:
        assert data.train_input is not None, f"{self.name} needs paired inputs"
        low, full = data.train_input[idx], data.train[idx]
        if self.augment:
            low, full = dihedral_pairs(low, full, generator=s.rng)
        low, full = low.to(self.device), full.to(self.device)

        # Discriminator: each example's real pair and fake pair share one per-sample
        # gradient (one backward), so one patient counts once.
        with s.learning_through(s.generator), torch.no_grad():
            fake = s.generator(low)
        loss_d = (F.softplus(-s.discriminator(low, full)) + F.softplus(s.discriminator(low, fake))).mean()
        s.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        s.opt_d.step()

        # Generator: adversarial + L1 (+ 1 - SSIM) to the original, per-sample clipped.
        params = self.params
        losses = {"loss-d": loss_d.item()}
        with s.learning_through(s.discriminator):
            fake = s.generator(low)
            loss_adv = F.softplus(-s.discriminator(low, fake)).mean()
            loss_l1 = (fake - full).abs().mean()
            loss_g = loss_adv + params.l1_weight * loss_l1
            if params.ssim_weight > 0:
                loss_ssim = (1 - ssim_per_image(fake, full)).mean()
                loss_g = loss_g + params.ssim_weight * loss_ssim
                losses["loss-ssim"] = loss_ssim.item()
            s.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            s.opt_g.step()
        return {**losses, "loss-g": loss_adv.item(), "loss-l1": loss_l1.item()}

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
