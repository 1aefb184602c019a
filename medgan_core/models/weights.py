"""Named weight arrays by parameter group: the only thing that crosses the wire.

A group is one network (``generator``, ``discriminator``); an array's name is
``<group>.<state-dict key>``, so strategies can split a flat record by prefix.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from medgan_core.arrays import check_arrays


def group_arrays(groups: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
    """Copy every group's state dict into float32 numpy arrays with prefixed names."""
    arrays: dict[str, np.ndarray] = {}
    for group, module in groups.items():
        for key, tensor in module.state_dict().items():
            arrays[f"{group}.{key}"] = tensor.detach().cpu().numpy().astype(np.float32, copy=True)
    return arrays


def expected_shapes(groups: Mapping[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    return {
        f"{group}.{key}": tuple(tensor.shape)
        for group, module in groups.items()
        for key, tensor in module.state_dict().items()
    }


def load_group_arrays(groups: Mapping[str, nn.Module], arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Load named arrays into the groups' modules after checking names, shapes and values."""
    check_arrays(arrays, expected_shapes(groups), source)
    for group, module in groups.items():
        prefix = f"{group}."
        state = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)


NORMALISATION_LAYERS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
                        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def all_but_norms_and_biases(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``module`` except normalisation layers' scales and shifts and the
    biases of other layers: what stays fixed when only those are fine-tuned."""
    return [param for layer in module.modules() if not isinstance(layer, NORMALISATION_LAYERS)
            for name, param in layer.named_parameters(recurse=False) if name != "bias"]
