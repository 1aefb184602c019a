"""Unpaired translation for domain adaptation (CycleGAN): a site's second CT scanner (B)
harmonised to the appearance of its main scanner (A).

Two residual U-Net generators (``ab``, ``ba``) and two PatchGANs (``a``, ``b``), trained
with adversarial, cycle-consistency and identity losses on scanner-A and scanner-B
images of *different* subjects: no pair is used in training. At clinical geometry, as the
other image-to-image tasks: both scanners' slices at ``task.spacing`` (0: their own pixels)
over the whole CT range, trained on ``image-size`` patches (most centred on the patient),
whole slices harmonised tile by tile. Held out, ``ba`` maps each scanner-B slice to A and
is scored against the same subject's scanner-A slice (whole-range and window PSNR, SSIM
in the window, MAE in HU inside the body) — the simulator can image one patient on both
scanners, which is what makes the evaluation honest; the training never sees it.

A scanner's calibration error (tens of HU) is a few hundredths of the whole CT range, so
every loss and both discriminators see each image twice (``views``): over the whole range
(bone and air must survive) and in the soft-tissue window, where that error is as large as
it looks to a reader.

The two generators form one parameter group and so do the two discriminators: each is
clipped as one vector per example, so under DP two networks step on each record.
Every step has an A phase and a B phase, each on its own Poisson batch of that
domain's records and each with one update of both groups; a record is in one domain
only, so per record a step is one release of the joint G-and-D mechanism (noise
multiplier σ/√2, ``joint_noise_multiplier``) at the sample rate.

Each generator ends in a ``SiteCalibration`` (output gain and offset, the identity at
start). Shared, it is part of the one model; with ``[aggregation] local-calibration`` each
hospital keeps its own, so the shared generators learn the appearance and every site the
calibration of its own scanner A, which one shared model can only average.
``task.identity-weight`` sets the identity term.

``task.histogram-start`` starts the generators from the classical answer: each reads its
input through the site's own histogram matching of scanner B's body pixels to scanner A's
(``IntensityMap``, fitted from the site's training images whenever it trains, inverted for
A to B), so an untrained model equals that matching and training learns what matching
cannot. The map's knots are the site's pixel quantiles: they stay at the site (as a local
array, kept in the site's state with ``local-calibration``, which the study requires), and
fitting them reads all the site's images at once, so it is refused under DP.

Harmonising to a noisy scanner A (a low-dose main scanner) need not copy its noise: the
held-out scores compare with one noisy scan, so the best output is the clean one. Two
settings let the generators drop noise: ``task.cycle-pool`` compares the cycle's round
trip with the original after average pooling, so the translation no longer has to carry
the input's pixel noise through to rebuild it, and ``task.tv-weight`` adds a total-variation
penalty on each translated image, which removes that noise and keeps edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medgan_core.config import TaskConfig, TaskParams
from medgan_core.data.dataset import DataSpec, SiteData, UnpairedDomains
from medgan_core.data.slice_store import random_crops
from medgan_core.errors import ConfigError, MedGANError
from medgan_core.models.unet import CycleDiscriminators, CycleGenerators
from medgan_core.tasks.base import TrainingSetup
from medgan_core.tasks.paired import HeldOutSliceParams, PairedImageTask

CYCLE_WEIGHT = 10.0  # CycleGAN's lambda (the identity weight is task.identity-weight: 5 = 0.5 * lambda)
OTHER = {"a": "b", "b": "a"}
VIEWS = 2  # what the discriminators and losses see of an image: the whole range and the window (``views``)
POOLS = (1, 2, 4)  # every image size (the training patch) divides by these


@dataclass(frozen=True)
class CycleParams(HeldOutSliceParams):
    """CycleGAN's losses (no paired target: no L1 or SSIM weights)."""

    identity_weight: float = 5.0  # weight of the identity loss (CycleGAN's 0.5 × the cycle weight; 0: off)
    cycle_pool: int = 1  # compare the cycle's round trip after average pooling by this factor (1: per pixel)
    tv_weight: float = 0.0  # weight of a total-variation penalty on each translated image (0: off)
    histogram_start: bool = False  # start both generators from the site's histogram matching of B to A

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.identity_weight < 0:
            raise ConfigError(f"task.identity-weight = {self.identity_weight}; it must be 0 (off) or a positive number")
        if self.cycle_pool not in POOLS:
            raise ConfigError(f"task.cycle-pool = {self.cycle_pool}; choose one of {', '.join(map(str, POOLS))}")
        if self.tv_weight < 0:
            raise ConfigError(f"task.tv-weight = {self.tv_weight}; it must be 0 (off) or a positive number")

    def dp_refusal(self, unit: str = "slice") -> str:
        if self.histogram_start:
            return ("task.histogram-start fits each site's intensity map to all of its training images at once, "
                    "outside DP-SGD's per-record guarantee; set task.histogram-start = false to train with DP")
        return super().dp_refusal(unit)


class CycleTask(PairedImageTask):
    name = "cycle"
    target_words = "the same subject on the main scanner"
    input_words = "the second scanner's image"
    Params: ClassVar[type[TaskParams]] = CycleParams
    params: CycleParams  # type: ignore[assignment]
    modalities = ("CT",)
    modality_reason = "it harmonises a site's two CT scanners"
    train_metrics = frozenset({"loss-d", "loss-g", "loss-cycle", "loss-tv", "loss-identity"})
    clinical = True
    patches_anywhere = 0.25  # the discriminators must see air and the table too
    # Unpaired: its data split by subject into one scanner's and the other's; a site's one or
    # two validation subjects cannot be split so (the fine-tune keeps its last model).
    validates = False

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        return UnpairedDomains("scanner-b", clinical=True)

    def build_networks(self) -> tuple[CycleGenerators, CycleDiscriminators]:
        return (CycleGenerators(self.config.width, histogram_start=self.params.histogram_start),
                CycleDiscriminators(self.config.width, channels=VIEWS))

    def train(self, data: SiteData, steps: int, seed: int, **kwargs: Any) -> dict[str, float]:
        """With ``histogram-start``, first fit the generators' histogram matching to this
        site's training images (the same images give the same map every round)."""
        if self.params.histogram_start:
            self.fit_histogram_match(data)
        return super().train(data, steps, seed, **kwargs)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        """A site that holds no map yet (round 0, before its first training, or one that never
        trained) is scored through its own histogram matching, fitted as training would fit it,
        not through the identity: an untrained histogram-start model is that matching."""
        match = self.generator.match
        if match is not None and not match.fitted and data.train_input is not None:
            self.fit_histogram_match(data)
        return super().evaluate(data)

    def unready_words(self) -> str:
        match = self.generator.match
        if match is None or match.fitted:
            return ""
        return ("this cycle model (task.histogram-start) reads scans through a site's own histogram matching, and "
                "this copy holds none (a model exported for a new site); fit it to your scanners with 'medgan adapt'")

    def fit_histogram_match(self, data: SiteData) -> None:
        """The site's scanner-B body pixels matched to its scanner-A ones (``IntensityMap.fit``)."""
        assert data.train_input is not None and self.body_level is not None, "cycle needs scanner-B CT images"
        match = self.generator.match
        assert match is not None, "the generators were built without task.histogram-start"
        try:
            match.fit(data.train_input, data.train, self.body_level)
        except ValueError as exc:
            raise MedGANError(f"site {data.site}: task.histogram-start cannot fit its intensity map: {exc}") from exc

    def batch_pools(self, data: SiteData) -> dict[str, int]:
        """Scanner A's and scanner B's training subjects: a record is in one pool only."""
        assert data.train_input is not None, "cycle needs scanner-B images"
        return {"a": len(data.train), "b": len(data.train_input)}

    def pool_subjects(self, data: SiteData) -> dict[str, torch.Tensor | None]:
        return {"a": data.train_subjects, "b": data.train_input_subjects}

    def train_step(self, s: TrainingSetup, data: SiteData, pool: str, idx: torch.Tensor) -> dict[str, float]:
        """One random ``image-size`` patch of each sampled slice (the record is still the slice)."""
        images = data.train if pool == "a" else data.train_input
        assert images is not None
        (patches,) = random_crops([images], idx, self.config.image_size, s.rng, centre_above=self.body_level,
                                  anywhere=self.patches_anywhere)
        return self._phase(s, patches.to(self.device), pool)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 1, H, W) whole-range CT -> (n, ``VIEWS``, H, W): the image and its soft-tissue window view."""
        return torch.cat([images, self.in_window(images)], dim=1)

    def _phase(self, s: TrainingSetup, real: torch.Tensor, domain: str) -> dict[str, float]:
        """One update of both groups from a batch of one domain's images: each record's
        losses are in one backward pass per group (one clipped per-sample gradient)."""
        other = OTHER[domain]
        forward, back = domain + other, other + domain
        parts = s.parts(len(real))  # one, unless task.physical-batch bounds a pass

        s.opt_d.zero_grad(set_to_none=True)
        losses = {"loss-d": 0.0}
        for part in parts:
            real_p = real[part.rows]
            with s.learning_through(s.generator), torch.no_grad():
                fake = s.generator(real_p, forward)
            loss_d = (F.softplus(-s.discriminator(self.views(real_p), domain))
                      + F.softplus(s.discriminator(self.views(fake), other))).mean()
            s.backward(loss_d, s.discriminator, part)
            s.step(s.opt_d, part)
            losses["loss-d"] += loss_d.item() * part.share

        params = self.params
        with s.learning_through(s.discriminator):
            s.opt_g.zero_grad(set_to_none=True)
            for part in parts:
                real_p = real[part.rows]
                real_views = self.views(real_p)  # the data's own: no gradient, shared by the losses below
                fake = s.generator(real_p, forward)
                fake_views = self.views(fake)
                terms = {"loss-g": F.softplus(-s.discriminator(fake_views, other)).mean(),
                         "loss-cycle": l1_per_view(pooled(self.views(s.generator(fake, back)), params.cycle_pool),
                                                   pooled(real_views, params.cycle_pool)),
                         "loss-tv": total_variation(fake_views)}
                loss = terms["loss-g"] + CYCLE_WEIGHT * terms["loss-cycle"] + params.tv_weight * terms["loss-tv"]
                if params.identity_weight:  # off, it costs no third generator pass
                    terms["loss-identity"] = l1_per_view(self.views(s.generator(real_p, back)), real_views)
                    loss = loss + params.identity_weight * terms["loss-identity"]
                s.backward(loss, s.generator, part)
                s.step(s.opt_g, part)
                for key, value in terms.items():
                    losses[key] = losses.get(key, 0.0) + value.item() * part.share
        return losses

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_scanner_pair

        return phantom_scanner_pair(n, self.config, seed=self.config.seed, clinical=True)


def pooled(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``images`` average-pooled by ``factor`` (1: as they are)."""
    return F.avg_pool2d(images, factor) if factor > 1 else images


def l1_per_view(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference in each channel (view), summed over the views: the window
    view's error counts as fully as if it were the only image."""
    return (a - b).abs().mean(dim=(0, 2, 3)).sum()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, down the rows plus across the
    columns, summed over the channels (views): large for pixel noise, small for the few
    edges of an anatomy."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(0, 2, 3)).sum()
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(0, 2, 3)).sum())
