"""Clipped gradient sums of deep convolutions without their per-sample gradients.

A convolution's per-sample weight gradient is ``G_i A_iᵀ``: its output gradients ``G_i``
(C_out × T positions) times its unfolded input ``A_i`` (C_in·k² × T). Deep in a
discriminator (few positions, many channels) that matrix is far larger than the two factors:
at 4×4 positions with 128 → 256 channels a batch of 64 holds 134 MB of per-sample gradients,
written once and read twice (norm, clipped sum) every step. DP-SGD needs only two things
from them, and both follow from the factors (Bu et al. 2023, "Differentially private
optimization on large model at small cost", book-keeping):

- each record's squared norm, ``‖G_i A_iᵀ‖² = Σ (A_iᵀA_i) ∘ (G_iᵀG_i)`` (ghost norm; Li et al.
  2022), a T × T product per record;
- the clipped sum ``Σ_i c_i G_i A_iᵀ``, one ordinary matrix product of the scaled output
  gradients with the inputs.

The result is the same clipped sum to rounding, so the noise, the sensitivity and the
privacy analysis do not change. A layer takes this form only where the ghost norm costs less
than materialising (``takes_ghost_form``); every other parameter keeps its per-sample gradient.
Several passes of a record through one layer (a pix2pix discriminator's real and generated
pairs) are one record's gradient: their positions are concatenated.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.tensor_utils import unfold2d
from torch import nn


def takes_ghost_form(layer: nn.Module, backprops: torch.Tensor) -> bool:
    """Whether ``layer``'s weight is clipped from its factors: an ungrouped Conv2d whose
    ghost norm (T²·(P + C_out) per record) costs less than its per-sample gradient (T·P·C_out)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or not layer.weight.requires_grad:
        return False
    positions = backprops.shape[-1] * backprops.shape[-2]
    patch = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return positions * (patch + layer.out_channels) < patch * layer.out_channels


def ghost_factors(layer: nn.Conv2d, activation: torch.Tensor, backprops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unfolded input B × P × T, output gradients B × C_out × T) of one pass through ``layer``."""
    batch = backprops.shape[0]
    unfolded = unfold2d(activation.to(backprops.dtype), kernel_size=layer.kernel_size, padding=layer.padding,
                        stride=layer.stride, dilation=layer.dilation)
    return unfolded, backprops.reshape(batch, layer.out_channels, -1)


def add_ghost_pass(param: nn.Parameter, unfolded: torch.Tensor, grads: torch.Tensor) -> None:
    """Keep one pass's factors of ``param`` (a convolution weight); a later pass of the same
    records in the same backward joins the record's positions."""
    terms = getattr(param, "ghost_factors", None)
    if terms is None:
        param.ghost_factors = (unfolded, grads)
        return
    if terms[0].shape[0] != unfolded.shape[0]:
        raise RuntimeError(f"passes of {terms[0].shape[0]} and {unfolded.shape[0]} records through one layer "
                           "in one backward: per-record gradients need the same records in every pass")
    param.ghost_factors = (torch.cat([terms[0], unfolded], dim=2), torch.cat([terms[1], grads], dim=2))


def average_ghost_views(param: nn.Parameter, views: int) -> None:
    """Fold each record's ``views`` adjacent rows into one record whose gradient is their mean
    (``multiplicity.average_views`` for a parameter kept as factors)."""
    unfolded, grads = param.ghost_factors
    if unfolded.shape[0] % views:
        raise RuntimeError(f"{unfolded.shape[0]} per-sample gradients are not whole records of {views} views")

    def fold(t: torch.Tensor) -> torch.Tensor:
        rows, width, positions = t.shape
        return t.reshape(rows // views, views, width, positions).transpose(1, 2).reshape(rows // views, width, -1)

    param.ghost_factors = (fold(unfolded), fold(grads) / views)


def ghost_norms_squared(param: nn.Parameter) -> torch.Tensor:
    """Each record's squared norm of ``param``'s gradient, from its factors."""
    unfolded, grads = param.ghost_factors
    gram_inputs = unfolded.transpose(1, 2) @ unfolded
    gram_grads = grads.transpose(1, 2) @ grads
    return (gram_inputs * gram_grads).sum(dim=(1, 2)).clamp(min=0)


def ghost_clipped_sum(param: nn.Parameter, clip_factors: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i ∇_i`` of ``param`` from its factors: one matrix product."""
    unfolded, grads = param.ghost_factors
    scaled = grads * clip_factors.to(grads.dtype)[:, None, None]
    summed = torch.einsum("bot,bpt->op", scaled, unfolded)
    return summed.reshape(param.shape).to(param.dtype)


def ghost_per_sample(param: nn.Parameter) -> torch.Tensor:
    """The per-sample gradients the factors stand for (what the clipping never materialises)."""
    unfolded, grads = param.ghost_factors
    return torch.einsum("bot,bpt->bop", grads, unfolded).reshape(-1, *param.shape)


def has_ghost(param: nn.Parameter) -> bool:
    return getattr(param, "ghost_factors", None) is not None


class GhostDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` for parameters with per-sample gradients, factors, or both: one
    norm per record over all of them, clipped to ``max_grad_norm``, the same Gaussian noise."""

    @property
    def grad_samples(self) -> List[torch.Tensor]:
        return [self._get_flat_grad_sample(p) for p in self.params if not has_ghost(p)]

    @property
    def accumulated_iterations(self) -> int:
        for p in self.params:
            if isinstance(getattr(p, "grad_sample", None), list) and len(p.grad_sample) > 1:
                raise ValueError("per-sample gradients of several backward passes: step after every backward")
        return 1

    def records_in_batch(self) -> int:
        """How many per-record gradients this step clips (rows of the per-sample gradients)."""
        for p in self.params:
            if has_ghost(p):
                return p.ghost_factors[0].shape[0]
            if getattr(p, "grad_sample", None) is not None:
                return self._get_flat_grad_sample(p).shape[0]
        raise ValueError("no per-sample gradient of any parameter: was the backward pass through the private network?")

    def clip_and_accumulate(self) -> None:
        records = self.records_in_batch()
        squared = torch.zeros(records, device=self.params[0].device)
        for p in self.params:
            if has_ghost(p):
                squared += ghost_norms_squared(p).to(squared.device)
            else:
                g = self._get_flat_grad_sample(p)
                squared += g.reshape(len(g), -1).square().sum(dim=1).to(squared.device)
        clip_factors = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if has_ghost(p):
                grad = ghost_clipped_sum(p, clip_factors.to(p.device))
            else:
                _check_processed_flag(p.grad_sample)
                grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
                grad = torch.einsum("i,i...", clip_factors.to(grad_sample.device).to(p.dtype), grad_sample)
                _mark_as_processed(p.grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[bool]:
        """Opacus' ``pre_step`` without its shortcut for 'no per-sample gradients' (a network
        whose every weight is kept as factors has none, and must still be clipped and noised)."""
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            p.ghost_factors = None
        super().zero_grad(set_to_none)
