"""Augmentation multiplicity: several augmented views of each sampled record in one DP-SGD
step, their per-sample gradients averaged into the record's one gradient before clipping.

De et al. (2022, "Unlocking high-accuracy differentially private image classification
through scale") found that averaging a record's gradient over several random views lowers
its variance without touching the noise: the record still contributes one gradient of
norm at most C, so the sensitivity, the noise multiplier and the accountant are those of
one view per record. Only the compute grows (``views`` forward and backward passes a record).

The views of a record are adjacent rows of the batch (``repeat_records``); Opacus computes
one per-sample gradient per row (under a mean loss over all rows, rescaled to each row's
own gradient), and ``average_views`` folds each record's ``views`` rows into their mean
before the private optimiser clips them.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from torch import nn

from medgan_core.privacy.ghost import average_ghost_views, has_ghost


def repeat_records(idx: torch.Tensor, views: int) -> torch.Tensor:
    """``idx`` with every record repeated ``views`` times in a row: [a, b] -> [a, a, b, b]."""
    if views < 1:
        raise ValueError(f"views must be at least 1, not {views}")
    return idx if views == 1 else idx.repeat_interleave(views)


def average_views(module: nn.Module, views: int) -> None:
    """Replace the per-sample gradients of ``module`` (Opacus-wrapped; a plain module is left
    alone: its gradient is already the mean over every view) by the mean over each record's
    ``views`` adjacent rows, so the private optimiser clips one gradient per record."""
    if views == 1 or not isinstance(module, GradSampleModule):
        return
    for param in module.parameters():
        if has_ghost(param):
            average_ghost_views(param, views)
            continue
        grad_sample = getattr(param, "grad_sample", None)
        if grad_sample is None:
            continue
        if not isinstance(grad_sample, torch.Tensor):
            raise RuntimeError("per-sample gradients of several backward passes cannot be averaged over views; "
                               "step the private optimiser after every backward pass")
        if grad_sample.shape[0] % views:
            raise RuntimeError(f"{grad_sample.shape[0]} per-sample gradients are not whole records of {views} views")
        param.grad_sample = grad_sample.reshape(-1, views, *grad_sample.shape[1:]).mean(dim=1)
