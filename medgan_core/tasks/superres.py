"""CT super-resolution (×2, ×4): a coarse-grid acquisition -> the original grid.

The input is the low-resolution series interpolated bicubically to the target grid (what
a viewer shows, and the classical baseline); the generator learns the missing detail. At
clinical geometry: the target grid is ``task.spacing`` (0: the original series' pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import DataSpec, DegradedPairs, upsample
from medgan_core.errors import ConfigError
from medgan_core.tasks.paired import PairedImageTask, PairedParams

SCALES = (2, 4)


@dataclass(frozen=True)
class SuperResParams(PairedParams):
    scale: int = 2  # the coarse grid's pixel is scale × scale fine pixels

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.scale not in SCALES:
            raise ConfigError(f"task.scale = {self.scale}; choose one of {', '.join(map(str, SCALES))}")


class SuperResTask(PairedImageTask):
    name = "superres"
    target_words = "the original grid"
    input_words = "bicubic interpolation of the coarse grid"
    Params = SuperResParams
    params: SuperResParams
    clinical = True

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        scale = config.params.scale  # type: ignore[attr-defined]
        return DegradedPairs(f"low-res-x{scale}", scale, clinical=True)

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_ct_pairs

        _, full = phantom_ct_pairs(n, self.config, seed=self.config.seed, clinical=True)
        scale = self.params.scale
        coarse = torch.nn.functional.avg_pool2d(full, scale)  # the coarse grid of the same anatomy
        return upsample(coarse, scale), full
