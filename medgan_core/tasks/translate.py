"""Paired modality translation, MR -> CT (pix2pix): synthetic CT for MR-only planning.

The same subject's MR and CT slices (matched by pair_id, aligned) train a U-Net generator
and a PatchGAN conditioned on the MR, adversarial + L1, at clinical geometry: patches of
whole slices at ``task.spacing`` (the MR resampled onto the CT's grid), CT over its whole
range, so bone comes out in HU. Evaluated on held-out subjects by MAE in HU inside the
body, PSNR and SSIM against the real CT.
"""

from __future__ import annotations

import torch
from torch import nn

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import DataSpec, ModalityPairs
from medgan_core.models.unet import ResidualUNet
from medgan_core.tasks.paired import PairedImageTask


class TranslateTask(PairedImageTask):
    name = "translate"
    target_words = "the subject's scan in the target modality"
    input_words = "the source modality"
    clinical = True
    patches_anywhere = 0.25  # not residual: it must learn that air stays air

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        """The target is ``task.modality`` (CT by default); the input the other modality."""
        return ModalityPairs("MR" if config.modality == "CT" else "CT", clinical=True)

    def build_generator(self) -> nn.Module:
        """Not residual: an MR intensity is no starting point for a HU value."""
        return ResidualUNet(self.config.width, in_channels=self.model_channels, residual=False)

    @property
    def input_modality(self) -> str:
        return "MR" if self.config.modality == "CT" else "CT"

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_mr_ct

        mr, ct = phantom_mr_ct(n, self.config, seed=self.config.seed, clinical=True)
        return (mr, ct) if self.config.modality == "CT" else (ct, mr)
