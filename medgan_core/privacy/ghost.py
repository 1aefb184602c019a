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
    """Keep one pass's factors of ``param`` (a convolution weight). A later pass in the same
    backward is the same records again (Opacus adds such per-sample gradients): their
    positions are joined. ``promote_ghost`` closes the backward."""
    current = getattr(param, "_ghost_current", None)
    if current is None:
        param._ghost_current = (unfolded, grads)
        return
    if current[0].shape[0] != unfolded.shape[0]:
        raise RuntimeError(f"passes of {current[0].shape[0]} and {unfolded.shape[0]} records through one layer "
                           "in one backward: per-record gradients need the same records in every pass")
    param._ghost_current = (torch.cat([current[0], unfolded], dim=2), torch.cat([current[1], grads], dim=2))


def promote_ghost(param: nn.Parameter) -> None:
    """End of a backward through ``param``'s layer: its factors become one more set of rows
    (a second backward before the step is other records, as Opacus stacks its per-sample gradients)."""
    factors = param.__dict__.pop("_ghost_current", None)
    if factors is not None:
        param.ghost_factors = [*(getattr(param, "ghost_factors", None) or []), factors]


def has_ghost(param: nn.Parameter) -> bool:
    return bool(getattr(param, "ghost_factors", None))


def drop_ghost(param: nn.Parameter) -> None:
    for name in ("ghost_factors", "_ghost_current"):
        param.__dict__.pop(name, None)


def average_ghost_views(param: nn.Parameter, views: int) -> None:
    """Fold each record's ``views`` adjacent rows into one record whose gradient is their mean
    (``multiplicity.average_views`` for a parameter kept as factors)."""
    if len(param.ghost_factors) > 1:
        raise RuntimeError("per-sample gradients of several backward passes cannot be averaged over views; "
                           "step the private optimiser after every backward pass")
    (unfolded, grads), = param.ghost_factors
    if unfolded.shape[0] % views:
        raise RuntimeError(f"{unfolded.shape[0]} per-sample gradients are not whole records of {views} views")

    def fold(t: torch.Tensor) -> torch.Tensor:
        rows, width, positions = t.shape
        return t.reshape(rows // views, views, width, positions).transpose(1, 2).reshape(rows // views, width, -1)

    param.ghost_factors = [(fold(unfolded), fold(grads) / views)]


def ghost_norms_squared(param: nn.Parameter) -> torch.Tensor:
    """Each record's squared norm of ``param``'s gradient, from its factors (rows of every set in turn)."""
    norms = []
    for unfolded, grads in param.ghost_factors:
        gram_inputs = unfolded.transpose(1, 2) @ unfolded
        gram_grads = grads.transpose(1, 2) @ grads
        norms.append((gram_inputs * gram_grads).sum(dim=(1, 2)).clamp(min=0))
    return torch.cat(norms)


def ghost_clipped_sum(param: nn.Parameter, clip_factors: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i ∇_i`` of ``param`` from its factors: one matrix product a set of rows."""
    summed, row = None, 0
    for unfolded, grads in param.ghost_factors:
        factors = clip_factors[row : row + grads.shape[0]].to(grads.dtype)
        part = torch.einsum("bot,bpt->op", grads * factors[:, None, None], unfolded)
        summed, row = part if summed is None else summed + part, row + grads.shape[0]
    return summed.reshape(param.shape).to(param.dtype)


def ghost_per_sample(param: nn.Parameter) -> torch.Tensor:
    """The per-sample gradients the factors stand for (what the clipping never materialises)."""
    return torch.cat([torch.einsum("bot,bpt->bop", grads, unfolded).reshape(-1, *param.shape)
                      for unfolded, grads in param.ghost_factors])


class GhostDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` for parameters with per-sample gradients, factors, or both: one
    norm per record over all of them, clipped to ``max_grad_norm``, the same Gaussian noise."""

    @property
    def grad_samples(self) -> List[torch.Tensor]:
        return [self._get_flat_grad_sample(p) for p in self.params if not has_ghost(p)]

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes since the last step (Opacus': the same for every parameter)."""
        counts = set()
        for p in self.params:
            if has_ghost(p):
                counts.add(len(p.ghost_factors))
            elif isinstance(getattr(p, "grad_sample", None), list):
                counts.add(len(p.grad_sample))
            elif getattr(p, "grad_sample", None) is not None:
                counts.add(1)
        if len(counts) != 1:
            raise ValueError(f"the parameters were in different numbers of backward passes: {sorted(counts)}")
        return counts.pop()

    def records_in_batch(self) -> int:
        """How many per-record gradients this step clips (rows of the per-sample gradients)."""
        for p in self.params:
            if has_ghost(p):
                return sum(unfolded.shape[0] for unfolded, _ in p.ghost_factors)
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
        if not self.params:  # nothing trainable: as Opacus, a plain optimiser
            return True
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
            drop_ghost(p)
        super().zero_grad(set_to_none)
