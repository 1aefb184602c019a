"""Which of a task's weight arrays leave the site, and which stay there.

The site (before it replies) and the server (before it accepts replies) both ask this,
with the same task and the same ``[aggregation]`` settings, so they agree on the names
without exchanging them. Local arrays are a whole group whose policy is ``local``
(e.g. a discriminator that learns each hospital's scanner), with ``local-norm`` (FedBN)
every normalisation layer's affine parameters, and with ``local-calibration`` every
site-calibration layer (a generator's output gain and offset). A site's histogram
matching (``IntensityMap``: quantiles of its own pixel values) is local whatever the
settings: it is site data, not a weight to average.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from torch import nn

from medgan_core.config import AggregationConfig
from medgan_core.models.calibration import SiteCalibration
from medgan_core.models.intensity_map import IntensityMap

if TYPE_CHECKING:
    from medgan_core.tasks.base import Task

NORM_LAYERS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
               nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_array_names(groups: Mapping[str, nn.Module]) -> set[str]:
    """Prefixed state-dict names of every normalisation layer (weights, biases, statistics)."""
    names = set()
    for group, module in groups.items():
        for layer_name, layer in module.named_modules():
            if isinstance(layer, NORM_LAYERS):
                prefix = f"{group}.{layer_name}." if layer_name else f"{group}."
                names |= {prefix + key for key in layer.state_dict()}
    return names


def calibration_array_names(groups: Mapping[str, nn.Module],
                            layers: type[nn.Module] | tuple[type[nn.Module], ...] = SiteCalibration) -> set[str]:
    """Prefixed state-dict names of every layer of type ``layers`` (by default every
    site-calibration layer: gain and offset)."""
    return {f"{group}.{layer_name}.{key}"
            for group, module in groups.items()
            for layer_name, layer in module.named_modules() if isinstance(layer, layers)
            for key in layer.state_dict()}


def local_array_names(groups: Mapping[str, nn.Module], aggregation: AggregationConfig) -> set[str]:
    """Names of the arrays that never leave a site under ``aggregation``."""
    policies = aggregation.policies(list(groups))
    local = {
        f"{group}.{key}"
        for group, module in groups.items()
        if policies[group] == "local"
        for key in module.state_dict()
    }
    local |= calibration_array_names(groups, IntensityMap)  # site data: never sent
    if aggregation.local_norm:
        local |= norm_array_names(groups)
    if aggregation.local_calibration:
        local |= calibration_array_names(groups)
    return local


def ordered_names(task: "Task") -> list[str]:
    """The legacy (SecAgg+) stack sends unnamed lists of arrays; both sides use this fixed order."""
    return sorted(task.weight_shapes())
