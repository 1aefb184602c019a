"""Unconditional synthesis for data augmentation: a DCGAN on 2D slices (whole slices
resized to ``image-size`` over the 400 mm field: 64 is 6.25 mm pixels, 128 is 3.125 mm;
``task.architecture = "skips"`` is the multi-scale form for 128 and up)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medgan_core.data.dataset import SiteData
from medgan_core.metrics.distribution import intensity_distance, sliced_wasserstein
from medgan_core.metrics.features import PhantomFeatureNet, feature_scores, load_feature_net
from medgan_core.models.dcgan import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights
from medgan_core.config import TaskConfig
from medgan_core.errors import ConfigError
from medgan_core.tasks.base import GANParams, GANTask, TrainingSetup


ARCHITECTURES = ("dcgan", "skips")
#: The most images a held-out evaluation may ask a site to generate (they are made in one batch).
MAX_EVAL_SAMPLES = 2048
#: The longest latent code a study may ask for (the generator's first layer grows with it).
MAX_Z_DIM = 1024


@dataclass(frozen=True)
class SynthesisParams(GANParams):
    z_dim: int = 64  # length of the generator's latent code
    eval_samples: int = 128  # generated images per held-out evaluation
    architecture: str = "dcgan"  # "skips": the multi-scale DCGAN for 128×128 and up (``medgan_core.models.dcgan``)
    #: Discriminator steps per generator step. Under DP a noisy discriminator falls behind a
    #: generator that steps as often, and the generator collapses onto whatever fools it;
    #: several private D steps per G step keep it a useful critic at the same ε (Bie et al.,
    #: "Private GANs, revisited", TMLR 2023). ``local-steps`` counts D steps. On the DP demo from scratch it
    #: did not stop the collapse (``benchmarks/results/synthesis-dp``), so it is 1 by default.
    d_steps: int = 1
    #: Weight of the mode-seeking term in the generator's loss (MSGAN, Mao et al. 2019): the
    #: inverse of how far apart two generated images are for how far apart their codes are,
    #: so a generator that maps every code onto one image pays for it. It reads no data:
    #: under DP it is part of the generator's post-processing of the private D. 0: off.
    mode_seeking: float = 0.0

    @property
    def skips(self) -> bool:
        return self.architecture == "skips"

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"task.architecture = {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        for key, value in (("task.z-dim", self.z_dim), ("task.eval-samples", self.eval_samples),
                           ("task.d-steps", self.d_steps)):
            if value <= 0:
                raise ConfigError(f"{key} = {value}; it must be a positive number")
        if self.z_dim > MAX_Z_DIM:
            raise ConfigError(f"task.z-dim = {self.z_dim}; at most {MAX_Z_DIM}")
        if self.eval_samples > MAX_EVAL_SAMPLES:
            raise ConfigError(f"task.eval-samples = {self.eval_samples}; at most {MAX_EVAL_SAMPLES} (a site generates "
                              "them at once)")
        if self.mode_seeking < 0:
            raise ConfigError(f"task.mode-seeking = {self.mode_seeking}; it must be 0 (off) or positive")
        if self.d_steps > task.local_steps:
            raise ConfigError(f"task.d-steps = {self.d_steps} exceeds task.local-steps = {task.local_steps}: "
                              "the generator would never step in a round")


class SynthesisTask(GANTask):
    """Non-saturating GAN loss, Adam(0.5, 0.999) as in DCGAN.

    Only the discriminator reads real images; the generator sees them only through the
    discriminator's gradients (post-processing of the private D).
    """

    name = "synthesis"
    Params = SynthesisParams
    params: SynthesisParams
    private_groups = ("discriminator",)
    steps_on_empty_batch = True  # it has its generated images: a DP step reveals nothing of the batch's size
    train_metrics = frozenset({"loss-d", "loss-g", "d-real", "d-fake"})
    eval_metrics = frozenset({"swd", "intensity-w1", "fid", "kid", "diversity", "precision", "recall"})
    headline_metric = "swd"
    metrics_note = ("`swd` is the sliced Wasserstein distance between multi-scale 7×7 patches of generated and real "
                    "slices, `intensity-w1` the Wasserstein-1 distance between their pixel-value distributions, "
                    "`fid`/`kid` the Fréchet and kernel distances on the project's phantom feature network (lower "
                    "is better); `diversity` the generated slices' mean pairwise feature distance as a share of the "
                    "real slices' (near 1: as varied as real anatomy; near 0: mode collapse), `precision` and "
                    "`recall` the shares of generated slices inside the real feature manifold and of real slices "
                    "inside the generated one (k = 3 nearest neighbours).")

    def build_networks(self) -> tuple[DCGANGenerator, DCGANDiscriminator]:
        cfg = self.config
        generator = DCGANGenerator(self.params.z_dim, cfg.image_size, cfg.width, skips=self.params.skips)
        discriminator = DCGANDiscriminator(cfg.image_size, cfg.width, skips=self.params.skips)
        generator.apply(init_dcgan_weights)
        discriminator.apply(init_dcgan_weights)
        return generator, discriminator

    def train_step(self, s: TrainingSetup, data: SiteData, pool: str, idx: torch.Tensor) -> dict[str, float]:
        real = data.train[idx].to(self.device)
        y_real = self.real_conditions(data, idx)
        n = real.shape[0]
        # Under DP the step generates the expected batch's number of images, not the Poisson
        # batch's: were it n, one more record would bring one more generated image, a second
        # clipped gradient in the discriminator's sum (sensitivity 2C, not the C the
        # accountant assumes), and the generator's step would see n too. So an empty batch is
        # still a step (``steps_on_empty_batch``): the generated images and the noise.
        m = s.expected_batch or n
        z = torch.randn(m, self.params.z_dim, generator=s.rng).to(self.device)
        y_fake = self.prior_conditions(m, s.rng)
        parts = s.parts(n + m)  # the real rows, then the generated ones; one part unless task.physical-batch
        generator_parts = s.parts(m)
        # The generator steps after every d-steps-th discriminator step (the round's last included).
        generator_steps = (s.steps_taken + 1) % self.params.d_steps == 0
        # One part: the generated images of the discriminator's step are the generator's
        # step's too (one generator pass). In parts, each step makes its own, one part at a time.
        with contextlib.nullcontext() if generator_steps else torch.no_grad():
            fake_all = _call(s.generator, z, y_fake) if len(parts) == 1 else None

        def generated(rows: slice) -> torch.Tensor:
            return fake_all[rows] if fake_all is not None else _call(s.generator, z[rows], _rows(y_fake, rows))

        # Discriminator: one pass over real and generated images together, on the mean loss
        # over all n + m of them (what Opacus' per-sample gradients assume), so under DP every
        # image is its own clipped per-sample gradient: a real record counts once and a
        # generated image, which depends on no record, costs no privacy. One pass instead of
        # one per half spares Opacus concatenating two sets of per-sample gradients, three
        # times at every clipping (44 % of a DP step's time before). With n = m the gradient
        # is half that of the two means' sum, which Adam's update does not see.
        sums = {"real-loss": 0.0, "real-p": 0.0, "fake-loss": 0.0, "fake-p": 0.0}
        s.opt_d.zero_grad(set_to_none=True)
        for part in parts:
            real_rows = slice(min(part.rows.start, n), min(part.rows.stop, n))
            fake_rows = slice(max(part.rows.start, n) - n, max(part.rows.stop, n) - n)
            with torch.no_grad() if fake_all is None else contextlib.nullcontext():
                fake = generated(fake_rows).detach()
            y_real_p, y_fake_p = _rows(y_real, real_rows), _rows(y_fake, fake_rows)
            y_both = None if y_real_p is None else torch.cat([y_real_p, y_fake_p])
            logits = _call(s.discriminator, torch.cat([real[real_rows], fake]), y_both)
            logits_real, logits_fake = logits[: len(logits) - len(fake)], logits[len(logits) - len(fake) :]
            losses = torch.cat([F.softplus(-logits_real), F.softplus(logits_fake)])
            s.backward(losses.mean(), s.discriminator, part)
            s.step(s.opt_d, part)
            with torch.no_grad():
                for key, value in (("real-loss", F.softplus(-logits_real)), ("real-p", torch.sigmoid(logits_real)),
                                   ("fake-loss", F.softplus(logits_fake)), ("fake-p", torch.sigmoid(logits_fake))):
                    sums[key] += value.sum().item()
        stats = {"d-fake": sums["fake-p"] / m}
        if n:  # the losses on real images (an empty Poisson batch has none)
            stats.update({"loss-d": sums["real-loss"] / n + sums["fake-loss"] / m, "d-real": sums["real-p"] / n})
        if not generator_steps:
            return stats

        # Generator: learns only through D's judgement of generated images.
        stats["loss-g"] = 0.0
        with s.learning_through(s.discriminator):
            s.opt_g.zero_grad(set_to_none=True)
            for part in generator_parts:
                fake = generated(part.rows)
                loss_g = F.softplus(-_call(s.discriminator, fake, _rows(y_fake, part.rows))).mean()
                if self.params.mode_seeking > 0:
                    loss_g = loss_g + self.params.mode_seeking * mode_seeking_penalty(fake, z[part.rows])
                s.backward(loss_g, s.generator, part)
                s.step(s.opt_g, part)
                stats["loss-g"] += loss_g.item() * part.share
        return stats

    def real_conditions(self, data: SiteData, idx: torch.Tensor) -> torch.Tensor | None:
        """Condition vectors of real training images (None: unconditional)."""
        return None

    def prior_conditions(self, n: int, rng: torch.Generator) -> torch.Tensor | None:
        """Condition vectors for generated images during training (None: unconditional)."""
        return None

    @torch.no_grad()
    def sample(self, n: int, seed: int, conditions: torch.Tensor | None = None) -> torch.Tensor:
        self.generator.eval()
        z = torch.randn(n, self.params.z_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)
        y = None if conditions is None else conditions.to(self.device)
        return _call(self.generator, z, y).cpu()

    def distribution_metrics(
        self, fake: torch.Tensor, real: torch.Tensor, features: PhantomFeatureNet | None = None
    ) -> dict[str, float]:
        """Patch SWD, intensity W1, and FID/KID on the project's own feature network."""
        features = features or load_feature_net(device=self.device)
        return {
            "swd": sliced_wasserstein(fake, real, seed=self.config.seed),
            "intensity-w1": intensity_distance(fake, real),
            **feature_scores(features, fake, real, seed=self.config.seed),
        }

    def evaluate(self, data: SiteData) -> dict[str, float]:
        fake = self.sample(self.params.eval_samples, seed=self.config.seed + 7919)
        return self.distribution_metrics(fake, data.test)

    def preview(self, n: int) -> torch.Tensor:
        return self.sample(n, seed=self.config.seed + 104729)


#: The side of the coarse grid ``mode_seeking_penalty`` compares generated images on.
MODE_SEEKING_GRID = 16


def mode_seeking_penalty(images: torch.Tensor, codes: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's term: 1 / (mean |I1 - I2| / mean |z1 - z2|) over the pairs of a batch's two
    halves, the images pooled to ``MODE_SEEKING_GRID`` (otherwise a generator escapes it with
    pixel noise); large when distinct codes give near-identical images (0 for a batch of one)."""
    half = len(images) // 2
    if half == 0:
        return images.new_zeros(())
    if images.shape[-1] > MODE_SEEKING_GRID:  # anatomy, not pixel noise: compare coarse images
        images = F.adaptive_avg_pool2d(images, MODE_SEEKING_GRID)
    image_gap = (images[:half] - images[half : 2 * half]).abs().flatten(1).mean(1)
    code_gap = (codes[:half] - codes[half : 2 * half]).abs().flatten(1).mean(1)
    return 1 / ((image_gap / code_gap).mean() + eps)


def _rows(conditions: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The condition vectors of ``rows`` (None: unconditional)."""
    return None if conditions is None else conditions[rows]


def _call(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """A network of an unconditional (y is None) or conditional GAN."""
    return net(x) if y is None else net(x, y)
