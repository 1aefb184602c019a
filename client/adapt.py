"""``medgan adapt``: a study's model fitted to a hospital outside the study, at that hospital.

A study that kept layers at its sites (FedBN's normalisation layers, site calibration,
local groups) exports, for a new hospital, the coordinator's initial values of those
layers (``medgan export --for-new-site``). ``adapt`` trains just those layers on the new
hospital's own training images (its manifest, read as a study site reads it: pairs for the
image-to-image tasks), every shared array frozen, scores the model on the site's held-out
split before and after, and writes a new model file whose provenance says what was done.
Where the hospital has validation subjects and the task can rank models on them, it keeps
the best model scored there every ``validate_every`` steps (the study's model included), as
a study site's personal fine-tune does; the test subjects only report.
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
from medgan_core.site_round import best_on_validation
from medgan_core.tasks.registry import load_task_data, load_task_validation


@dataclass(frozen=True)
class Adapted:
    path: Path
    layers: int
    before: dict[str, float]
    after: dict[str, float]
    kept_steps: int  # the steps of the model kept (fewer than asked where validation chose an earlier one)


def site_kept_arrays(model: ModelFile) -> set[str]:
    """The arrays the study kept at its sites, from the aggregation settings in the provenance."""
    settings: dict[str, Any] = model.provenance.get("aggregation") or {}
    aggregation = AggregationConfig(policy=settings.get("policy", "average"),
                                    group_policies=settings.get("group-policies", ""),
                                    local_norm=bool(settings.get("local-norm", False)),
                                    local_calibration=bool(settings.get("local-calibration", False)))
    return local_array_names(model.build().groups, aggregation)


def adapt_model(model: ModelFile, data_path: str | Path, out: str | Path, *, steps: int, seed: int = 0,
                all_layers: bool = False, device: torch.device | str = "cpu",
                validate_every: int = AggregationConfig.finetune_validate_every) -> Adapted:
    if steps < 1:
        raise MedGANError(f"--steps {steps}: adapt at least one step")
    if validate_every < 0:
        raise MedGANError(f"--validate-every {validate_every}: give a number of steps, or 0 to keep the last model")
    task = model.build(device)
    trainable = set(task.get_weights()) if all_layers else site_kept_arrays(model)
    if not trainable:
        raise MedGANError("this model kept no layers at the study's sites (every array was shared); pass "
                          "--all-layers to fine-tune the whole model on this site's images")
    data = load_task_data(data_path, model.task)
    for group, module in task.groups.items():
        # A group with no kept layer (a shared discriminator) still learns, so the kept layers
        # have an adversary that answers them; its values are put back below.
        helper = not any(f"{group}.{name}" in trainable for name, _ in module.named_parameters())
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(helper or f"{group}.{name}" in trainable)
    before = task.evaluate(data)
    original = task.get_weights()
    held_out = load_task_validation(data_path, model.task) if task.validates and validate_every else None
    if held_out is None:
        task.train(data, steps, seed)
        adapted, kept = task.get_weights(), steps
        chosen = "the last step"
    else:
        adapted, kept = best_on_validation(task, data, steps, validate_every, seed, held_out, str(data_path))
        chosen = (f"the best of every {validate_every} steps on the site's {len(held_out.test)} validation slices "
                  f"({task.headline_metric})")
    frozen = {name: original[name] for name in adapted if name not in trainable}  # buffers and shared arrays
    task.set_weights({**adapted, **frozen}, source="adapted model")
    after = task.evaluate(data)
    layers = "every layer" if all_layers else f"the {len(trainable)} site-kept arrays (shared arrays frozen)"
    provenance = {**model.provenance,
                  "adapted": {"steps": kept, "steps-asked": steps, "kept": chosen, "training-records": data.num_train,
                              "trained": layers, "held-out-before": before, "held-out-after": after,
                              "where": "at the hospital that ran 'medgan adapt'; its images never left it"}}
    path = save_model(out, task.get_weights(), model.task, provenance)
    return Adapted(path, len(trainable), before, after, kept)
