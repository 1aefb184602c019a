"""Compressed-sensing MR reconstruction from undersampled k-space (4× or 10× acceleration).

The generator is a residual U-Net on the zero-filled image followed by a data-consistency
layer: the k-space lines the scanner measured are kept exactly, the network fills in the
missing ones; a PatchGAN conditioned on the zero-filled image keeps the filling realistic.
Evaluated against the fully sampled image by PSNR, SSIM and NMSE, beside the zero-filled
inverse FFT (the input).
"""

from __future__ import annotations

import torch
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import pairs_of
from medgan_core.models.unet import DataConsistentUNet
from medgan_core.tasks.paired import PairedImageTask


def nmse(output: torch.Tensor, target: torch.Tensor) -> float:
    """Normalised squared error ‖x̂ - x‖² / ‖x‖² on intensities (not the [-1, 1] scaling), per slice, averaged."""
    out, ref = (output.double() + 1) / 2, (target.double() + 1) / 2
    per_slice = ((out - ref) ** 2).flatten(1).sum(1) / (ref**2).flatten(1).sum(1).clamp_min(1e-12)
    return float(per_slice.mean())


class ReconTask(PairedImageTask):
    name = "recon"
    eval_metrics = frozenset({"nmse", "nmse-input", "psnr", "psnr-input", "ssim", "ssim-input"})
    input_channels = 3  # zero-filled real, imaginary, sampling mask

    @classmethod
    def data_kind_for(cls, config: TaskConfig) -> str:
        return pairs_of(f"kspace-r{config.acceleration}")

    def build_generator(self) -> nn.Module:
        return DataConsistentUNet(self.config.width)

    def input_image(self, inputs: torch.Tensor) -> torch.Tensor:
        """The zero-filled reconstruction: magnitude of the inverse FFT of the measured lines."""
        magnitude = torch.sqrt(((inputs[:, 0:1] + 1) / 2) ** 2 + (inputs[:, 1:2] / 2) ** 2)
        return 2 * magnitude - 1

    def extra_metrics(self, output: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
        return {"nmse": nmse(output, target), "nmse-input": nmse(baseline, target)}

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_mr_kspace

        return phantom_mr_kspace(n, self.config, seed=self.config.seed)
