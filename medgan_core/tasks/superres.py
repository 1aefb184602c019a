"""CT super-resolution (×2, ×4): a coarse-grid acquisition -> the original grid.

The input is the low-resolution series interpolated bicubically to the target grid (what
a viewer shows, and the classical baseline); the generator learns the missing detail.
"""

from __future__ import annotations

import torch

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import pairs_of, upsample
from medgan_core.tasks.paired import PairedImageTask


class SuperResTask(PairedImageTask):
    name = "superres"

    @classmethod
    def data_kind_for(cls, config: TaskConfig) -> str:
        return pairs_of(f"low-res-x{config.scale}")

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_ct_pairs

        _, full = phantom_ct_pairs(n, self.config, seed=self.config.seed)
        scale = self.config.scale
        coarse = torch.nn.functional.avg_pool2d(full, scale)  # the coarse grid of the same anatomy
        return upsample(coarse, scale), full
