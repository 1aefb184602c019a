"""Compressed-sensing MR reconstruction from undersampled k-space (4× or 10× acceleration).

The generator is a residual U-Net on the zero-filled image followed by a data-consistency
layer: the k-space lines the scanner measured are kept exactly, the network fills in the
missing ones; a PatchGAN conditioned on the zero-filled image keeps the filling realistic.
Evaluated against the fully sampled image by PSNR, SSIM and NMSE, beside the zero-filled
inverse FFT (the input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import DataSpec, KSpacePairs
from medgan_core.data.kspace import ACCELERATIONS
from medgan_core.errors import ConfigError
from medgan_core.models.unet import DataConsistentUNet
from medgan_core.tasks.paired import PairedImageTask, PairedParams


@dataclass(frozen=True)
class ReconParams(PairedParams):
    acceleration: int = 4  # k-space undersampling: 4 (25 % of the lines) or 10 (10 %)

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.acceleration not in ACCELERATIONS:
            raise ConfigError(
                f"task.acceleration = {self.acceleration}; choose one of {', '.join(map(str, ACCELERATIONS))}")


def nmse(output: torch.Tensor, target: torch.Tensor) -> float:
    """Normalised squared error ‖x̂ - x‖² / ‖x‖² on intensities (not the [-1, 1] scaling), per slice, averaged."""
    out, ref = (output.double() + 1) / 2, (target.double() + 1) / 2
    per_slice = ((out - ref) ** 2).flatten(1).sum(1) / (ref**2).flatten(1).sum(1).clamp_min(1e-12)
    return float(per_slice.mean())


class ReconTask(PairedImageTask):
    name = "recon"
    target_words = "the fully sampled image"
    input_words = "the zero-filled inverse FFT"
    Params = ReconParams
    params: ReconParams
    modalities = ("MR",)
    modality_reason = "it reconstructs MR k-space"
    eval_metrics = frozenset({"nmse", "nmse-input", "psnr", "psnr-input", "ssim", "ssim-input"})
    input_channels = 3  # zero-filled real, imaginary, sampling mask

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        return KSpacePairs(config.params.acceleration)  # type: ignore[attr-defined]

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

        return phantom_mr_kspace(n, self.config, self.params.acceleration, seed=self.config.seed)
