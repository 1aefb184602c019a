"""Unpaired translation for domain adaptation (CycleGAN): a site's second CT scanner (B)
harmonised to the appearance of its main scanner (A).

Two residual U-Net generators (``ab``, ``ba``) and two PatchGANs (``a``, ``b``), trained
with adversarial, cycle-consistency and identity losses on scanner-A and scanner-B
images of *different* subjects: no pair is used in training. Held out, ``ba`` maps each
scanner-B slice to A and is scored against the same subject's scanner-A slice (PSNR,
SSIM, MAE in HU) — the simulator can image one patient on both scanners, which is what
makes the evaluation honest; the training never sees it.

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
``task.crop-size`` trains on random patches, ``task.identity-weight`` sets the identity term.

Harmonising to a noisy scanner A (a low-dose main scanner) need not copy its noise: the
held-out scores compare with one noisy scan, so the best output is the clean one. Two
settings let the generators drop noise: ``task.cycle-pool`` compares the cycle's round
trip with the original after average pooling, so the translation no longer has to carry
the input's pixel noise through to rebuild it, and ``task.tv-weight`` adds a total-variation
penalty on each translated image, which removes that noise and keeps edges.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from medgan_core.data.dataset import SCANNER_B_UNPAIRED, SiteData
from medgan_core.models.unet import CycleDiscriminators, CycleGenerators
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, poisson_batch
from medgan_core.tasks.base import TrainingSetup, set_hooks
from medgan_core.tasks.paired import PairedImageTask

CYCLE_WEIGHT = 10.0  # CycleGAN's lambda (the identity weight is task.identity-weight: 5 = 0.5 * lambda)
OTHER = {"a": "b", "b": "a"}


class CycleTask(PairedImageTask):
    name = "cycle"
    train_metrics = frozenset({"loss-d", "loss-g", "loss-cycle", "loss-tv", "loss-identity"})
    data_kind = SCANNER_B_UNPAIRED
    target_loss_keys: ClassVar[frozenset[str]] = frozenset()  # unpaired: no target to compare with
    trains_on_crops = True  # every loss is per pixel or per patch, none needs the whole slice

    def build_networks(self) -> tuple[CycleGenerators, CycleDiscriminators]:
        return CycleGenerators(self.config.width), CycleDiscriminators(self.config.width)

    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        assert data.train_input is not None, "cycle needs scanner-B images"
        pools = {"a": data.train, "b": data.train_input}
        keys = ["loss-d", "loss-g", "loss-cycle", "loss-tv"] + (["loss-identity"] if self.config.identity_weight else [])
        totals = dict.fromkeys(keys, 0.0)
        updates = 0
        with self.training_setup(dp, seed) as s:
            for _ in range(steps):
                batches = self._batches(pools, s, dp, accountant)
                for domain, idx in batches.items():
                    if idx.numel() == 0:
                        continue  # an empty Poisson batch: the step is spent, nothing learned
                    real = self._crops(pools[domain][idx], s.rng).to(self.device)
                    for key, value in self._phase(s, real, domain).items():
                        totals[key] += value
                    updates += 1
        return {k: v / max(updates, 1) for k, v in totals.items()}

    def _batches(
        self, pools: dict[str, torch.Tensor], s: TrainingSetup, dp: DPSettings | None, accountant: SiteAccountant | None
    ) -> dict[str, torch.Tensor]:
        if dp is None:
            return {d: torch.randint(0, len(x), (min(self.config.batch_size, len(x)),), generator=s.rng)
                    for d, x in pools.items()}
        self.account_step(dp, accountant)  # each record is in one scanner's pool: one joint release
        return {d: poisson_batch(len(x), dp.sample_rate, s.sampler) for d, x in pools.items()}

    def _crops(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A random ``task.crop-size`` square of each image (crop-size 0: the images as
        they are). The fully convolutional networks learn the same mapping from patches at a
        fraction of the cost per step, so a round affords more, and more varied, steps."""
        size = self.config.crop_size
        n, _, height, width = images.shape
        if not size or (size >= height and size >= width):
            return images
        rows = torch.randint(0, height - size + 1, (n,), generator=rng).tolist()
        cols = torch.randint(0, width - size + 1, (n,), generator=rng).tolist()
        return torch.stack([images[i, :, r:r + size, c:c + size] for i, (r, c) in enumerate(zip(rows, cols))])

    def _phase(self, s: TrainingSetup, real: torch.Tensor, domain: str) -> dict[str, float]:
        """One update of both groups from a batch of one domain's images: each record's
        losses are in one backward pass per group (one clipped per-sample gradient)."""
        other = OTHER[domain]
        forward, back = domain + other, other + domain

        set_hooks(s.generator, enabled=False)
        with torch.no_grad():
            fake = s.generator(real, forward)
        set_hooks(s.generator, enabled=True)
        loss_d = (F.softplus(-s.discriminator(real, domain)) + F.softplus(s.discriminator(fake, other))).mean()
        s.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        s.opt_d.step()

        set_hooks(s.discriminator, enabled=False)
        config = self.config
        fake = s.generator(real, forward)
        loss_adv = F.softplus(-s.discriminator(fake, other)).mean()
        loss_cycle = (pooled(s.generator(fake, back), config.cycle_pool) - pooled(real, config.cycle_pool)).abs().mean()
        loss_tv = total_variation(fake)
        loss = loss_adv + CYCLE_WEIGHT * loss_cycle + config.tv_weight * loss_tv
        losses = {"loss-d": loss_d.item(), "loss-g": loss_adv.item(), "loss-cycle": loss_cycle.item(),
                  "loss-tv": loss_tv.item()}
        if config.identity_weight:  # off, it costs no third generator pass
            loss_identity = (s.generator(real, back) - real).abs().mean()
            loss = loss + config.identity_weight * loss_identity
            losses["loss-identity"] = loss_identity.item()
        s.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        s.opt_g.step()
        set_hooks(s.discriminator, enabled=True)
        return losses

    def preview_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medgan_core.data.simulate import phantom_scanner_pair

        return phantom_scanner_pair(n, self.config, seed=self.config.seed)


def pooled(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``images`` average-pooled by ``factor`` (1: as they are)."""
    return F.avg_pool2d(images, factor) if factor > 1 else images


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, down the rows plus across the
    columns: large for pixel noise, small for the few edges of an anatomy."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())
