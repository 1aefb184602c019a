"""Paired image-to-image GANs (pix2pix style): a residual U-Net generator and a
conditional PatchGAN discriminator, adversarial + L1 loss.

Denoising and super-resolution share this: the generator maps a degraded image (low
dose; bicubic-interpolated low resolution) to the original on the same grid, learning
only the correction. Both networks read real images (the generator reads the degraded
input), so under DP both train with DP-SGD on the same Poisson batch: per step one
release of their joint mechanism (noise multiplier σ/√2), accounted once.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.data.augment import dihedral_average, dihedral_pairs
from medgan_core.data.dataset import SiteData
from medgan_core.data.preprocess import CT_FULL_RANGE, to_hu, window_ct
from medgan_core.data.slice_store import chunks, context_rows, gather_context, random_crops
from medgan_core.metrics.image_quality import BODY_THRESHOLD_HU, ct_scores, psnr_ssim, ssim_per_image
from medgan_core.models.tiling import tiled
from medgan_core.models.unet import PatchDiscriminator, ResidualUNet
from medgan_core.config import TaskConfig, TaskParams
from medgan_core.errors import ConfigError, DataError
from medgan_core.privacy.multiplicity import average_views, repeat_records
from medgan_core.tasks.base import GANParams, GANTask, TrainingSetup

EVAL_BATCH = 64  # images (or tiles) through the generator at once
EVAL_SLICES = 8  # whole clinical slices restored and scored at once
MAX_CONTEXT = 3  # task.context-slices: neighbours on each side at most


@dataclass(frozen=True)
class HeldOutSliceParams(GANParams):
    """Settings of the image-to-image tasks' held-out scoring."""

    #: Held-out slices a site scores per evaluation, evenly spaced through its test split
    #: (0: all of them). Whole slices at clinical geometry take a second or more each on a
    #: CPU: a demo or a quick look scores a few, a benchmark all.
    eval_slices: int = 0

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.eval_slices < 0:
            raise ConfigError(f"task.eval-slices = {self.eval_slices}; give a number of held-out slices, or 0 to "
                              "score all of them")


@dataclass(frozen=True)
class PairedParams(HeldOutSliceParams):
    """The loss to the paired target beside the adversarial one."""

    l1_weight: float = 100.0  # weight of the L1 fidelity term
    ssim_weight: float = 0.0  # weight of a (1 - SSIM) term (0: none)
    #: Random views (patch place, and flip/turn where the task augments) of each sampled
    #: slice per step, their gradients averaged into the slice's one clipped gradient under
    #: DP (augmentation multiplicity, ``medgan_core.privacy.multiplicity``): the same ε,
    #: ``views-per-record`` times the compute of a step.
    views_per_record: int = 1
    #: Neighbouring slices on each side of a slice that the networks read beside it, as
    #: extra input channels (2.5D; 0: each slice alone). They come from the slice's own
    #: series, its edge slice standing in past an end. Not under DP: a slice would be in its
    #: neighbours' records too, while ε bounds what one record changes.
    context_slices: int = 0

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if not 0 <= self.context_slices <= MAX_CONTEXT:
            raise ConfigError(f"task.context-slices = {self.context_slices}; choose 0 (each slice alone) to "
                              f"{MAX_CONTEXT} neighbours on each side")
        if self.l1_weight <= 0:
            raise ConfigError(f"task.l1-weight = {self.l1_weight}; it must be a positive number")
        if self.ssim_weight < 0:
            raise ConfigError(f"task.ssim-weight = {self.ssim_weight}; it must be 0 (off) or a positive number")
        if self.views_per_record < 1:
            raise ConfigError(f"task.views-per-record = {self.views_per_record}; it must be a whole number >= 1 "
                              "(1: one view of each sampled slice)")

    @property
    def step_views(self) -> int:
        return self.views_per_record

    def dp_refusal(self, unit: str = "slice") -> str:
        """With the slice as DP's record, a slice read as another's neighbour is in two records;
        with the patient, a slice's neighbours (of its own series) are its own patient's."""
        if self.context_slices and unit != "patient":
            return (f"task.context-slices = {self.context_slices} puts each slice in its neighbours' records too, "
                    "and DP's ε bounds what one record changes; set task.context-slices = 0, or [privacy] unit = "
                    "\"patient\" (a slice's neighbours are its own patient's), to train with DP")
        return ""


class PairedImageTask(GANTask):
    """Degraded input -> original, evaluated against the original on held-out pairs."""

    Params: ClassVar[type[TaskParams]] = PairedParams
    params: PairedParams
    private_groups = ("generator", "discriminator")
    train_metrics = frozenset({"loss-d", "loss-g", "loss-l1", "loss-ssim"})
    eval_metrics = frozenset({"mae-hu", "mae-hu-input", "psnr", "psnr-input", "psnr-window", "psnr-window-input",
                              "ssim", "ssim-input"})
    headline_metric = "psnr"
    validates = True
    #: The target and the input, in words, for the report (``metrics_note``).
    target_words: ClassVar[str] = "the target"
    input_words: ClassVar[str] = "the input"

    #: At clinical geometry (``DegradedPairs(clinical=True)``): whole slices at ``task.spacing``
    #: over the whole CT range, trained on ``image-size`` patches, restored tile by tile.
    clinical: ClassVar[bool] = False
    #: Share of training patches drawn anywhere on the slice; the rest are centred on the
    #: patient. A residual network leaves air as it is; one that makes another modality's
    #: values must learn the air too.
    patches_anywhere: ClassVar[float] = 0.0

    @classmethod
    def note(cls) -> str:
        if cls.clinical:
            return (f"At clinical geometry, on whole held-out slices: `psnr` of the output against "
                    f"{cls.target_words} over the whole CT range (-1024 to 3071 HU), `psnr-window` and `ssim` in "
                    "the soft-tissue window, `mae-hu` the mean absolute error in HU inside the body, bone "
                    f"included; `-input`: the same for {cls.input_words}, the classical baseline.")
        return (f"`psnr`/`ssim` of the output against {cls.target_words}; `-input`: the same for "
                f"{cls.input_words}, the classical baseline; `mae-hu` the mean absolute error in HU within "
                "the window (CT targets); `nmse` the normalised squared error (MR reconstruction).")
    preview_columns = 3
    preview_count = 4
    #: Channels of the degraded input (the discriminator sees them beside the candidate).
    input_channels: ClassVar[int] = 1
    #: Train on random flips/quarter turns of each pair (``dihedral_pairs``): only where the
    #: input stays a valid input when turned (not k-space, whose mask is not an image).
    augment: ClassVar[bool] = False
    #: Restore by averaging the model over the 8 flips/quarter turns (``dihedral_average``);
    #: for a model trained on turned pairs, 8x the inference cost for a cleaner estimate.
    self_ensemble: ClassVar[bool] = False
    #: ``previewed_pairs``' phantoms, with the number asked for (set on the object, not the class).
    _preview_pairs: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def build_networks(self) -> tuple[nn.Module, PatchDiscriminator]:
        return self.build_generator(), PatchDiscriminator(self.config.width, channels=self.model_channels + 1)

    def build_generator(self) -> nn.Module:
        return ResidualUNet(self.config.width, in_channels=self.model_channels)

    @property
    def context(self) -> int:
        """Neighbouring slices on each side the networks read (``task.context-slices``; cycle
        has no such setting)."""
        return int(getattr(self.params, "context_slices", 0))

    @property
    def model_channels(self) -> int:
        """Channels of the networks' input: the degraded slice's, then each neighbour's."""
        return self.input_channels * (2 * self.context + 1)

    def with_context(self, inputs: torch.Tensor, series: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """The networks' inputs for ``rows`` of a stack of degraded slices: each row's slice,
        with its ``context`` neighbours in its own series (``series``: slice counts) as channels."""
        if not self.context:
            return inputs[rows]
        return gather_context(inputs, self._context_rows(series, rows))

    def _context_rows(self, series: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        if series is None:
            raise DataError(f"task.context-slices = {self.context} needs to know which series each slice belongs "
                            "to, and these slices came without it")
        return context_rows(series, rows, self.context)

    def restore_series(self, inputs: torch.Tensor, series: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """``restore`` on ``rows`` (default: all) of a stack of degraded slices (``series``: each
        series' slice count in order; None: one series), each with its neighbours where the
        model reads them, a few slices at a time."""
        if not self.context:
            return self.restore(inputs if rows is None else inputs[rows])
        series = torch.tensor([len(inputs)]) if series is None else series
        rows = torch.arange(len(inputs)) if rows is None else rows
        return torch.cat([self.restore(self.with_context(inputs, series, rows[part]))
                          for part in chunks(len(rows), EVAL_SLICES)])

    def input_image(self, inputs: torch.Tensor) -> torch.Tensor:
        """The degraded input as an image (n, 1, H, W): the classical baseline the output is
        compared with (low-dose image, bicubic interpolation, zero-filled reconstruction, the
        source modality)."""
        return inputs

    def extra_metrics(self, output: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
        """Task-specific held-out metrics beyond PSNR/SSIM (and MAE in HU for CT)."""
        return {}

    def training_pair(self, data: SiteData, idx: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the sampled records ``idx``: whole images of ``image-size``,
        else one random patch of each sampled slice (the record is still the slice), on the body."""
        assert data.train_input is not None, f"{self.name} needs paired inputs"
        size = self.config.image_size
        if tuple(data.train.shape[-2:]) == (size, size):
            return self.with_context(data.train_input, data.train_series, idx), data.train[idx]
        neighbours = {0: self._context_rows(data.train_series, idx)} if self.context else None
        low, full = random_crops([data.train_input, data.train], idx, size, rng, centre_above=self.body_level,
                                 anywhere=self.patches_anywhere, neighbours=neighbours)
        return low, full

    def train_step(self, s: TrainingSetup, data: SiteData, pool: str, idx: torch.Tensor) -> dict[str, float]:
        views = self.params.views_per_record
        if views > 1 and not self.augment and tuple(data.train.shape[-2:]) == (self.config.image_size,) * 2:
            raise ConfigError(
                f"task.views-per-record = {views}, but this site's slices are whole {self.config.image_size}-pixel "
                f"images and {self.name} does not flip or turn them: every view would be the same image "
                "(the same gradient at several times the compute); set it to 1, or a smaller image-size")
        low, full = self.training_pair(data, repeat_records(idx, views), s.rng)  # each view its own patch
        if self.augment:
            low, full = dihedral_pairs(low, full, generator=s.rng)
        low, full = low.to(self.device), full.to(self.device)
        parts = s.parts(len(idx), views)  # one, unless task.physical-batch bounds a pass

        # Discriminator: each example's real pair and fake pair share one per-sample
        # gradient (one backward), so one patient counts once.
        s.opt_d.zero_grad(set_to_none=True)
        loss_d = 0.0
        for part in parts:
            low_p, full_p = low[part.rows], full[part.rows]
            with s.learning_through(s.generator), torch.no_grad():
                fake = s.generator(low_p)
            loss = (F.softplus(-s.discriminator(low_p, full_p)) + F.softplus(s.discriminator(low_p, fake))).mean()
            s.backward(loss, s.discriminator, part)
            average_views(s.discriminator, views)
            s.step(s.opt_d, part)
            loss_d += loss.item() * part.share

        # Generator: adversarial + L1 (+ 1 - SSIM) to the original, per-sample clipped.
        params = self.params
        losses = {"loss-d": loss_d, "loss-g": 0.0, "loss-l1": 0.0}
        if params.ssim_weight > 0:
            losses["loss-ssim"] = 0.0
        with s.learning_through(s.discriminator):
            s.opt_g.zero_grad(set_to_none=True)
            for part in parts:
                low_p, full_p = low[part.rows], full[part.rows]
                fake = s.generator(low_p)
                loss_adv = F.softplus(-s.discriminator(low_p, fake)).mean()
                loss_l1 = (fake - full_p).abs().mean()
                loss_g = loss_adv + params.l1_weight * loss_l1
                terms = {"loss-g": loss_adv, "loss-l1": loss_l1}
                if params.ssim_weight > 0:  # SSIM as reported: in the soft-tissue window for whole-range CT
                    loss_ssim = (1 - ssim_per_image(self.in_window(fake), self.in_window(full_p))).mean()
                    loss_g = loss_g + params.ssim_weight * loss_ssim
                    terms["loss-ssim"] = loss_ssim
                s.backward(loss_g, s.generator, part)
                average_views(s.generator, views)
                s.step(s.opt_g, part)
                for key, value in terms.items():
                    losses[key] += value.item() * part.share
        return losses

    @torch.no_grad()
    def restore(self, images: torch.Tensor) -> torch.Tensor:
        """The generator on any number of degraded images of any size: whole slices larger
        than the training patch are restored tile by tile (``medgan_core.models.tiling``)."""
        self.generator.eval()
        size = self.config.image_size

        def run(batch: torch.Tensor) -> torch.Tensor:
            return tiled(self.generator, batch, size, EVAL_BATCH, self.device)

        return (dihedral_average(run, images) if self.self_ensemble else run(images)).clamp(-1, 1)

    @property
    def body_level(self) -> float | None:
        """A target value above which a pixel is inside the patient (CT: ``BODY_THRESHOLD_HU``)."""
        if self.config.modality != "CT":
            return None
        low, high = self.ct_range
        return (BODY_THRESHOLD_HU - low) / (high - low) * 2.0 - 1.0

    def in_window(self, images: torch.Tensor) -> torch.Tensor:
        """Whole-range CT images as the soft-tissue window shows them, in [-1, 1] (differentiable
        inside the window); other images as they are."""
        low, high = self.ct_range
        window_low, window_high = self.config.window_low, self.config.window_high
        if self.config.modality != "CT" or (low, high) == (window_low, window_high):
            return images
        hu = (images + 1.0) / 2.0 * (high - low) + low
        return ((hu - window_low) / (window_high - window_low)).clamp(0.0, 1.0) * 2.0 - 1.0

    @property
    def ct_range(self) -> tuple[float, float]:
        """What [-1, 1] means in HU for this task's CT images."""
        return CT_FULL_RANGE if self.clinical else (self.config.window_low, self.config.window_high)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        assert data.test_input is not None
        if self.clinical and self.config.modality == "CT":
            return self._evaluate_clinical(data)
        rows = self.scored_rows(len(data.test))
        target, inputs = (data.test, data.test_input) if rows is None else (data.test[rows], data.test_input[rows])
        output = self.restore_series(data.test_input, data.test_series, rows)
        baseline = self.input_image(inputs)
        psnr, ssim = psnr_ssim(output, target)
        psnr_in, ssim_in = psnr_ssim(baseline, target)
        metrics = {"psnr": psnr, "ssim": ssim, "psnr-input": psnr_in, "ssim-input": ssim_in}
        if self.config.modality == "CT":
            hu_per_unit = (self.config.window_high - self.config.window_low) / 2.0
            metrics["mae-hu"] = float((output - target).abs().mean()) * hu_per_unit
        return {**metrics, **self.extra_metrics(output, target, baseline)}

    def scored_rows(self, n: int) -> torch.Tensor | None:
        """The rows of an ``n``-slice test split an evaluation scores: ``eval-slices`` of them
        evenly spaced from the first to the last, or None for all."""
        wanted = self.params.eval_slices
        if not wanted or wanted >= n:
            return None
        return torch.linspace(0, n - 1, wanted).round().long()  # distinct: steps of at least 1

    def validation_score(self, held_out: SiteData) -> float:
        """The headline PSNR on ``held_out``, restored without the self-ensemble: it ranks
        models of one training run as the ensemble does (measured on the denoising
        benchmark's fine-tunes) at an eighth of the time."""
        ensemble, self.self_ensemble = self.self_ensemble, False
        try:
            return self.evaluate(held_out)[self.headline_metric]
        finally:
            self.self_ensemble = ensemble

    def _evaluate_clinical(self, data: SiteData) -> dict[str, float]:
        """Whole held-out slices, a few at a time (a site's test split need not fit in memory)."""
        assert data.test_input is not None
        window = (self.config.window_low, self.config.window_high)
        scores: dict[str, list[float]] = {}
        scored = self.scored_rows(len(data.test))
        rows = torch.arange(len(data.test)) if scored is None else scored
        for part in chunks(len(rows), EVAL_SLICES):
            target, inputs = data.test[rows[part]], data.test_input[rows[part]]
            model_inputs = self.with_context(data.test_input, data.test_series, rows[part])
            for suffix, images in (("", self.restore(model_inputs)), ("-input", self.input_image(inputs))):
                for key, values in ct_scores(images, target, self.ct_range, window).items():
                    scores.setdefault(key + suffix, []).extend(values)
        return {key: float(np.mean(values)) for key, values in scores.items()}

    @abstractmethod
    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (degraded, original) pairs the coordinator makes itself (no patient data)."""

    def previewed_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``preview_pairs``, made once per task object: the coordinator previews the same
        phantoms every round, and at clinical geometry making them takes seconds of CPU."""
        cached = self._preview_pairs
        if cached is None or cached[0] != n:
            cached = self._preview_pairs = (n, self.preview_pairs(n))
        return cached[1]

    def preview(self, n: int) -> torch.Tensor:
        """Rows of input | output | target on the coordinator's own phantom slices, shown in
        the soft-tissue window."""
        degraded, original = self.previewed_pairs(n)  # consecutive slices of one phantom subject
        out = self.restore_series(degraded)
        rows = [self.displayed(self.input_image(degraded).clamp(-1, 1), self.input_modality),
                self.displayed(out, self.config.modality), self.displayed(original.clamp(-1, 1), self.config.modality)]
        return torch.stack(rows, dim=1).reshape(-1, 1, *degraded.shape[-2:])

    @property
    def input_modality(self) -> str:
        """The modality of the degraded input (the target's, unless a task translates)."""
        return self.config.modality

    def displayed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """Images as a grid shows them: CT on the whole range put into the soft-tissue window."""
        window = (self.config.window_low, self.config.window_high)
        if modality != "CT" or self.ct_range == window:
            return images
        return torch.from_numpy(window_ct(to_hu(images.numpy(), *self.ct_range), *window))
