"""Compressed-sensing MR reconstruction from undersampled k-space (4× or 10× acceleration).

The generator is a residual U-Net on the zero-filled image followed by a data-consistency
layer: the k-space lines the scanner measured are kept exactly, the network fills in the
missing ones; a PatchGAN conditioned on the zero-filled image keeps the filling realistic.
With ``task.tv-start`` = λ the U-Net starts from the site's TV compressed-sensing
reconstruction at λ instead (computed once per slice at load, from that slice's k-space
alone), so the untrained model is the classical method and training learns the rest.
Evaluated against the fully sampled image by PSNR, SSIM and NMSE, beside the zero-filled
inverse FFT (the input).

It works on the acquired matrix (``task.spacing`` 0; e.g. 256×256) or a coarser one of
``task.spacing`` mm. The sampling mask picks phase-encoding columns, so each image row
is its own 1D reconstruction problem: training reads strips of ``image-size`` whole rows
(a quarter of a 256-row slice at 64), data consistency is exact on a strip, and whole
slices are restored in one pass. Under DP the record is still the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.compressed_sensing import MAX_TV_WEIGHT
from medgan_core.data.dataset import DataSpec, KSpacePairs, SiteData
from medgan_core.data.kspace import ACCELERATIONS
from medgan_core.errors import ConfigError
from medgan_core.models.unet import DataConsistentUNet
from medgan_core.tasks.paired import EVAL_SLICES, PairedImageTask, PairedParams


MAX_CASCADES = 8


@dataclass(frozen=True)
class ReconParams(PairedParams):
    acceleration: int = 4  # k-space undersampling: 4 (25 % of the lines) or 10 (10 %)
    cascades: int = 1  # (U-Net, data consistency) stages in a row
    tv_start: float = 0.0  # λ of the TV-CS reconstruction the model starts from (0: the zero-filled image)

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.acceleration not in ACCELERATIONS:
            raise ConfigError(
                f"task.acceleration = {self.acceleration}; choose one of {', '.join(map(str, ACCELERATIONS))}")
        if self.context_slices:
            raise ConfigError(f"task.context-slices = {self.context_slices}; recon reconstructs each slice from its "
                              "own k-space (set it to 0)")
        if not 1 <= self.cascades <= MAX_CASCADES:
            raise ConfigError(f"task.cascades = {self.cascades}; choose 1 to {MAX_CASCADES}")
        if not 0 <= self.tv_start <= MAX_TV_WEIGHT:
            raise ConfigError(f"task.tv-start = {self.tv_start}; it is the TV weight λ of the reconstruction the model "
                              f"starts from, 0 (off: start from the zero-filled image) up to {MAX_TV_WEIGHT:g} "
                              "(the recon benchmark uses 0.005-0.01)")


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
    input_channels = 3  # zero-filled real, imaginary, sampling mask (and the TV start: model_channels)

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        params: ReconParams = config.params  # type: ignore[assignment]
        return KSpacePairs(params.acceleration, params.tv_start)

    @property
    def model_channels(self) -> int:
        return self.input_channels + int(self.params.tv_start > 0)

    def build_generator(self) -> nn.Module:
        return DataConsistentUNet(self.config.width, self.params.cascades, tv_start=self.params.tv_start > 0)

    def training_pair(self, data: SiteData, idx: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random strip of ``image-size`` whole rows of each sampled slice (the slice whole
        when it has no more rows): full width, so every row's k-space is all there."""
        assert data.train_input is not None, "recon needs undersampled inputs"
        rows, size = data.train.shape[-2], self.config.image_size
        if rows <= size:
            return data.train_input[idx], data.train[idx]
        tops = torch.randint(0, rows - size + 1, (len(idx),), generator=rng).tolist()
        strips = [(data.train_input[i, :, t : t + size], data.train[i, :, t : t + size])
                  for i, t in zip(idx.tolist(), tops)]
        return torch.stack([x for x, _ in strips]), torch.stack([y for _, y in strips])

    @torch.no_grad()
    def restore(self, images: torch.Tensor) -> torch.Tensor:
        """Whole slices, a few at a time: data consistency needs every column of a row."""
        self.generator.eval()
        out = [self.generator(images[i : i + EVAL_SLICES].to(self.device)).cpu()
               for i in range(0, len(images), EVAL_SLICES)]
        return torch.cat(out).clamp(-1, 1) if out else images[:, :1].clone()

    def input_image(self, inputs: torch.Tensor) -> torch.Tensor:
        """The zero-filled reconstruction: magnitude of the inverse FFT of the measured lines."""
        magnitude = torch.sqrt(((inputs[:, 0:1] + 1) / 2) ** 2 + (inputs[:, 1:2] / 2) ** 2)
        return 2 * magnitude - 1

    def extra_metrics(self, output: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
        return {"nmse": nmse(output, target), "nmse-input": nmse(baseline, target)}

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_mr_kspace

        return phantom_mr_kspace(n, self.config, self.params.acceleration, seed=self.config.seed)
