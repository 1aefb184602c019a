"""DP-SGD pieces: which layers Opacus can train, Poisson batches, private optimisers.

A task hands its real-image modules to ``make_private`` once per round (a fresh wrap of
a fresh module, so hooks never stack); the plain module stays what travels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from medgan_core.errors import PrivacyError
from medgan_core.privacy.ghost import GhostDPOptimizer
from medgan_core.privacy.per_sample import FastConvGradSampleModule


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD parameters one site trains with in one round."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    secure_rng: bool = True
    #: What one record is, the unit ε protects: a ``slice``, or a ``patient`` (a batch then
    #: draws patients, each giving one of its slices; ``PatientRows``).
    unit: str = "slice"


def joint_noise_multiplier(noise_multiplier: float, releases_per_step: int) -> float:
    """The noise multiplier of the one mechanism that ``releases_per_step`` private networks
    stepping on the same Poisson batch form together.

    Each network clips every record's gradient to C and adds N(0, σ²C²) per coordinate.
    Stacked, the k noisy sums are one Gaussian mechanism whose sensitivity is √k·C with
    the same per-coordinate noise: multiplier σ/√k, one subsampled release per step.
    Counting them as k independent subsampled releases under-counts ε (amplification
    by sampling would be claimed k times for one draw of the batch).
    """
    return noise_multiplier / math.sqrt(releases_per_step)


def privacy_generator(dp: DPSettings, seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for Poisson sampling (CPU) or DP noise (on the parameters' device: Opacus
    draws the noise there, and CUDA refuses a CPU generator); OS entropy unless ``secure_rng`` is off."""
    generator = torch.Generator(device=device)
    return generator.manual_seed(int.from_bytes(os.urandom(8), "little") if dp.secure_rng else seed)


def validate_private_modules(modules: Mapping[str, nn.Module]) -> None:
    """Refuse, before any training, a module Opacus cannot train privately; name the layer."""
    for group, module in modules.items():
        for name, layer in module.named_modules():
            if any(True for _ in layer.children()):
                continue
            kind = type(layer).__name__
            if getattr(layer, "padding_mode", "zeros") != "zeros":  # a convolution padded otherwise
                # Opacus computes its per-sample gradients as if zero-padded: they would not add
                # up to the layer's gradient, and clipping would bound the wrong vectors.
                raise PrivacyError(
                    f"{group}.{name or kind} ({kind}) cannot be trained with differential privacy: "
                    f"padding_mode={layer.padding_mode!r} (Opacus' per-sample gradients assume zero padding). "
                    "Use padding_mode='zeros', or pad with an explicit layer before it."
                )
            errors = ModuleValidator.validate(layer, strict=False)
            if errors:
                raise PrivacyError(
                    f"{group}.{name or kind} ({kind}) cannot be trained with differential privacy: "
                    f"{str(errors[0]).split('.')[0]}. Use GroupNorm/InstanceNorm instead."
                )


def make_private(
    module: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings, generator: torch.Generator | None = None
) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``module`` for per-sample gradients (Opacus', convolutions by the faster exact form:
    ``per_sample``, deep ones' weights as factors: ``ghost``) and ``optimizer`` for clipping and noise."""
    wrapped = FastConvGradSampleModule(module)
    private = GhostDPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.expected_batch_size,
        generator=generator,
    )
    return wrapped, private


@dataclass(frozen=True)
class PatientRows:
    """A pool's rows grouped by patient, for batches that sample patients: each patient is in
    a batch with probability q (Poisson), and a patient in it gives one of its slices, drawn
    uniformly. One patient then adds one clipped gradient to a step, however many slices
    they have: DP-SGD's analysis with the patient as the record (user-level DP by sampling
    one example per user)."""

    order: torch.Tensor  # the pool's rows, patient by patient
    starts: torch.Tensor  # where each patient's rows begin in ``order``
    counts: torch.Tensor  # each patient's slice count

    @classmethod
    def of(cls, subjects: torch.Tensor) -> "PatientRows":
        """From each row's patient number (``SiteData.train_subjects``)."""
        subjects = torch.as_tensor(subjects, dtype=torch.int64)
        order = torch.argsort(subjects, stable=True)
        _, counts = torch.unique_consecutive(subjects[order], return_counts=True)
        return cls(order, torch.cumsum(counts, 0) - counts, counts)

    @property
    def patients(self) -> int:
        return len(self.counts)

    def draw(self, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
        """Row indices of a batch: a Poisson sample of patients, one random slice of each."""
        chosen = poisson_batch(self.patients, sample_rate, generator)
        offsets = (torch.rand(len(chosen), generator=generator) * self.counts[chosen]).long()
        return self.order[self.starts[chosen] + torch.minimum(offsets, self.counts[chosen] - 1)]


def poisson_batch(num_examples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each example is in it with probability ``sample_rate``.

    The privacy analysis of DP-SGD (amplification by sampling) assumes exactly this, so the
    batch size varies from step to step and can be 0.
    """
    return torch.nonzero(torch.rand(num_examples, generator=generator) < sample_rate).flatten()
