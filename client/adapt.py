"""``medgan adapt``: a study's model fitted to a hospital outside the study, at that hospital.

A study that kept layers at its sites (FedBN's normalisation layers, site calibration,
local groups) exports, for a new hospital, the coordinator's initial values of those
layers (``medgan export --for-new-site``). ``adapt`` trains just those layers on the new
hospital's own training images (its manifest, read as a study site reads it: pairs for the
image-to-image tasks), every shared array frozen, scores the model on the site's held-out
split before and after, and writes a new model file whose provenance says what was done.
Nothing leaves the hospital, so no privacy budget is spent: the images never leave it and
the model file stays with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgan_core.config import AggregationConfig
from medgan_core.errors import MedGANError
from medgan_core.model_file import ModelFile, save_model
from medgan_core.sharing import local_array_names
from medgan_core.tasks.registry import load_task_data


@dataclass(frozen=True)
class Adapted:
    path: Path
    layers: int
    before: dict[str, float]
    after: dict[str, float]


def site_kept_arrays(model: ModelFile) -> set[str]:
    """The arrays the study kept at its sites, from the aggregation settings in the provenance."""
    settings: dict[str, Any] = model.provenance.get("aggregation") or {}
    aggregation = AggregationConfig(policy=settings.get("policy", "average"),
                                    group_policies=settings.get("group-policies", ""),
                                    local_norm=bool(settings.get("local-norm", False)),
                                    local_calibration=bool(settings.get("local-calibration", False)))
    return local_array_names(model.build().groups, aggregation)


def adapt_model(model: ModelFile, data_path: str | Path, out: str | Path, *, steps: int, seed: int = 0,
                all_layers: bool = False, device: torch.device | str = "cpu") -> Adapted:
    if steps < 1:
        raise MedGANError(f"--steps {steps}: adapt at least one step")
    task = model.build(device)
    trainable = set(task.get_weights()) if all_layers else site_kept_arrays(model)
    if not trainable:
        raise MedGANError("this model kept no layers at the study's sites (every array was shared); pass "
                          "--all-layers to fine-tune the whole model on this site's images")
    data = load_task_data(data_path, model.task)
    for group, module in task.groups.items():
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(f"{group}.{name}" in trainable)
    before = task.evaluate(data)
    original = task.get_weights()
    task.train(data, steps, seed)
    adapted = task.get_weights()
    frozen = {name: original[name] for name in adapted if name not in trainable}  # buffers and shared arrays
    task.set_weights({**adapted, **frozen}, source="adapted model")
    after = task.evaluate(data)
    layers = "every layer" if all_layers else f"the {len(trainable)} site-kept arrays (shared arrays frozen)"
    provenance = {**model.provenance,
                  "adapted": {"steps": steps, "training-records": data.num_train, "trained": layers,
                              "held-out-before": before, "held-out-after": after,
                              "where": "at the hospital that ran 'medgan adapt'; its images never left it"}}
    path = save_model(out, task.get_weights(), model.task, provenance)
    return Adapted(path, len(trainable), before, after)
