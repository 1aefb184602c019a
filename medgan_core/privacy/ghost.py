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
- the clipped sum ``Σ_i c_i G_i A_iᵀ``, the layer's ordinary batched weight gradient with
  each record's output gradients scaled by its clip factor.

The result is the same clipped sum to rounding, so the noise, the sensitivity and the
privacy analysis do not change. A layer takes this form only where the ghost norm costs less
than materialising (``takes_ghost_form``); every other parameter keeps its per-sample gradient.
Several passes of a record through one layer (a pix2pix discriminator's real and generated
pairs) are one record's gradient: their positions are concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.tensor_utils import unfold2d
from torch import nn


def takes_ghost_form(layer: nn.Module, backprops: torch.Tensor) -> bool:
    """Whether ``layer``'s weight is clipped from its factors: an ungrouped, numerically padded
    Conv2d whose ghost norm (T²·(P + C_out) per record) costs less than its per-sample
    gradient (T·P·C_out)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or isinstance(layer.padding, str) \
            or not layer.weight.requires_grad:
        return False
    positions = backprops.shape[-1] * backprops.shape[-2]
    patch = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return positions * (patch + layer.out_channels) < patch * layer.out_channels


@dataclass
class GhostRows:
    """One backward's factors of a convolution weight: one row per record."""

    layer: nn.Conv2d
    unfolded: torch.Tensor  # records × P × T, every pass's positions side by side
    grads: torch.Tensor  # records × C_out × T
    #: each pass's input and output gradients as recorded (rows: records × ``views``), for the clipped sum
    passes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    views: int = 1

    @property
    def records(self) -> int:
        return self.unfolded.shape[0]


def add_ghost_pass(param: nn.Parameter, layer: nn.Conv2d, activation: torch.Tensor, backprops: torch.Tensor) -> None:
    """Keep one pass's factors of ``layer``'s weight ``param``. A later pass in the same
    backward is the same records again (Opacus adds such per-sample gradients): their
    positions are joined. ``promote_ghost`` closes the backward."""
    activation = activation.to(backprops.dtype)
    unfolded = unfold2d(activation, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                        dilation=layer.dilation)
    grads = backprops.reshape(backprops.shape[0], layer.out_channels, -1)
    current: GhostRows | None = getattr(param, "_ghost_current", None)
    if current is None:
        param._ghost_current = GhostRows(layer, unfolded, grads, [(activation, backprops)])
        return
    if current.records != unfolded.shape[0]:
        raise RuntimeError(f"passes of {current.records} and {unfolded.shape[0]} records through one layer "
                           "in one backward: per-record gradients need the same records in every pass")
    current.unfolded = torch.cat([current.unfolded, unfolded], dim=2)
    current.grads = torch.cat([current.grads, grads], dim=2)
    current.passes.append((activation, backprops))


def promote_ghost(param: nn.Parameter) -> None:
    """End of a backward through ``param``'s layer: its factors become one more set of rows
    (a second backward before the step is other records, as Opacus stacks its per-sample gradients)."""
    rows = param.__dict__.pop("_ghost_current", None)
    if rows is not None:
        param.ghost_factors = [*(getattr(param, "ghost_factors", None) or []), rows]


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
    rows: GhostRows = param.ghost_factors[0]
    if rows.records % views:
        raise RuntimeError(f"{rows.records} per-sample gradients are not whole records of {views} views")

    def fold(t: torch.Tensor) -> torch.Tensor:
        records, width, positions = t.shape
        return t.reshape(records // views, views, width, positions).transpose(1, 2).reshape(records // views, width, -1)

    rows.unfolded, rows.grads, rows.views = fold(rows.unfolded), fold(rows.grads) / views, rows.views * views


def ghost_norms_squared(param: nn.Parameter) -> torch.Tensor:
    """Each record's squared norm of ``param``'s gradient, from its factors (rows of every set in turn)."""
    norms = []
    for rows in param.ghost_factors:
        gram_inputs = rows.unfolded.transpose(1, 2) @ rows.unfolded
        gram_grads = rows.grads.transpose(1, 2) @ rows.grads
        norms.append((gram_inputs * gram_grads).sum(dim=(1, 2)).clamp(min=0))
    return torch.cat(norms)


def ghost_clipped_sum(param: nn.Parameter, clip_factors: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i ∇_i`` of ``param``: the layer's ordinary batched weight gradient with each
    record's output gradients scaled by its clip factor (over its views: c_i / views each)."""
    summed, first = torch.zeros_like(param), 0
    for rows in param.ghost_factors:
        factors = clip_factors[first : first + rows.records].to(rows.grads.dtype) / rows.views
        first += rows.records
        per_row = factors.repeat_interleave(rows.views)[:, None, None, None]
        layer = rows.layer
        for activation, backprops in rows.passes:
            summed += torch.nn.grad.conv2d_weight(activation, param.shape, backprops * per_row, layer.stride,
                                                  layer.padding, layer.dilation, layer.groups).to(param.dtype)
    return summed


def ghost_per_sample(param: nn.Parameter) -> torch.Tensor:
    """The per-sample gradients the factors stand for (what the clipping never materialises)."""
    return torch.cat([torch.einsum("bot,bpt->bop", rows.grads, rows.unfolded).reshape(-1, *param.shape)
                      for rows in param.ghost_factors])


class GhostDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` for parameters with per-sample gradients, factors, or both: one
    norm per record over all of them, clipped to ``max_grad_norm``, the same Gaussian noise."""

    @property
    def grad_samples(self) -> List[torch.Tensor]:
        """The materialised per-sample gradients only (Opacus' version fails on a weight kept as factors)."""
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
                return sum(rows.records for rows in p.ghost_factors)
            if getattr(p, "grad_sample", None) is not None:
                return self._get_flat_grad_sample(p).shape[0]
        raise ValueError("no per-sample gradient of any parameter: was the backward pass through the private network?")

    def clip_and_accumulate(self) -> None:
        """Each record's norm over every parameter, its clip factor, and the clipped sums, in
        float32 whatever precision the forward pass ran in (autocast off; a bfloat16
        per-sample gradient is taken to float32 for its norm and for its share of the sum
        alike, so the factor clips exactly what is added)."""
        with torch.autocast(self.params[0].device.type, enabled=False):
            self._clip_and_accumulate()

    def _clip_and_accumulate(self) -> None:
        records = self.records_in_batch()
        squared = torch.zeros(records, device=self.params[0].device)
        for p in self.params:
            if has_ghost(p) and getattr(p, "grad_sample", None) is not None:
                raise RuntimeError("a weight holds both factors and per-sample gradients: part of each record's "
                                   "gradient would go unclipped")
            if has_ghost(p):
                squared += ghost_norms_squared(p).to(squared.device)
            else:
                g = self._get_flat_grad_sample(p)
                squared += g.reshape(len(g), -1).float().square().sum(dim=1).to(squared.device)
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

    def noise_only_step(self) -> None:
        """The step of a Poisson batch that drew no record: a zero clipped sum plus the noise,
        as Opacus steps on an empty batch. Skipping it would let the released model tell
        whether the batch was empty, which the privacy analysis does not cover."""
        for p in self.params:
            drop_ghost(p)
            p.grad_sample = None
            p.summed_grad = torch.zeros_like(p)
        self.add_noise()
        for p in self.params:
            p.grad /= self.expected_batch_size
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        self.original_optimizer.step()

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            drop_ghost(p)
        super().zero_grad(set_to_none)
