"""Conditional synthesis (cGAN) for augmenting rare classes: slices of a requested
lesion-burden grade or severity.

The condition of a real slice is its lesion burden — the fraction of the liver that is
lesion, from the subject's label map — either as a grade (``task.condition = "grade"``:
0 none, 1 up to 5 %, 2 up to 15 %, 3 above; one-hot) or as the score itself
(``"severity"``: burden / 0.5, a scalar in [0, 1]). The generator appends the condition
to its latent code; the discriminator sees it as extra image channels.

Privacy: as for unconditional synthesis only the discriminator reads real images and
their conditions (DP-SGD). Generated images are drawn for conditions from a public,
fixed prior (grades uniform; severities 0 a quarter of the time, else uniform), never
from the site's labels, so the generator is still post-processing of the private D.
The uniform prior also oversamples the rare severe grades, which is what augmentation
wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import DataSpec, SiteData, SlicesWithBurden
from medgan_core.errors import ConfigError
from medgan_core.metrics.features import N_GRADES, burden_grade, load_feature_net
from medgan_core.models.dcgan import ConditionalDiscriminator, ConditionalGenerator, init_dcgan_weights
from medgan_core.tasks.synthesis import SynthesisParams, SynthesisTask

GRADES = N_GRADES
SEVERITY_SCALE = 0.5  # burden of severity 1.0
#: One burden per grade: the preview rows, and what evaluation asks the generator for.
PREVIEW_BURDENS = (0.0, 0.03, 0.1, 0.3)


CONDITIONS = ("grade", "severity")


@dataclass(frozen=True)
class ConditionalParams(SynthesisParams):
    condition: str = "grade"  # lesion-burden grade 0-3 (a class), or the burden itself ("severity")

    def validate(self, task: TaskConfig) -> None:
        super().validate(task)
        if self.condition not in CONDITIONS:
            raise ConfigError(f"task.condition = {self.condition!r}; choose one of {', '.join(CONDITIONS)}")


def balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean recall over the classes present in ``truth``."""
    return float(torch.stack([(predicted[truth == c] == c).float().mean() for c in truth.unique()]).mean())


class ConditionalSynthesisTask(SynthesisTask):
    name = "conditional"
    eval_metrics = SynthesisTask.eval_metrics | {"grade-accuracy", "grade-accuracy-real", "severity-mae",
                                                 "severity-mae-real"}
    metrics_note = SynthesisTask.metrics_note + (
        " `grade-accuracy` is the share of generated slices whose lesion burden reads as the grade asked for "
        "(`severity-mae` the error of the severity read); `-real`: the same reading of real slices, its ceiling.")
    Params = ConditionalParams
    params: ConditionalParams

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        return SlicesWithBurden()

    @property
    def cond_dim(self) -> int:
        return GRADES if self.params.condition == "grade" else 1

    def build_networks(self) -> tuple[ConditionalGenerator, ConditionalDiscriminator]:
        cfg = self.config
        generator = ConditionalGenerator(self.params.z_dim, self.cond_dim, cfg.image_size, cfg.width,
                                         skips=self.params.skips)
        discriminator = ConditionalDiscriminator(self.cond_dim, cfg.image_size, cfg.width, skips=self.params.skips)
        generator.apply(init_dcgan_weights)
        discriminator.apply(init_dcgan_weights)
        return generator, discriminator

    def encode(self, burden: torch.Tensor) -> torch.Tensor:
        """Lesion burdens (n,) -> condition vectors (n, cond_dim)."""
        if self.params.condition == "grade":
            return F.one_hot(burden_grade(burden), GRADES).float()
        return (burden / SEVERITY_SCALE).clamp(0, 1)[:, None].float()

    def real_conditions(self, data: SiteData, idx: torch.Tensor) -> torch.Tensor:
        assert data.train_condition is not None, "conditional synthesis needs each slice's lesion burden"
        return self.encode(data.train_condition[idx]).to(self.device)

    def prior_conditions(self, n: int, rng: torch.Generator) -> torch.Tensor:
        if self.params.condition == "grade":
            return F.one_hot(torch.randint(0, GRADES, (n,), generator=rng), GRADES).float().to(self.device)
        severity = torch.rand(n, generator=rng) * (torch.rand(n, generator=rng) > 0.25)
        return severity[:, None].to(self.device)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        """Distribution metrics of images generated for the held-out slices' own
        conditions; and whether generated images show the burden asked for, read by the
        feature network's lesion segmenter for an equal number of each grade (balanced:
        rare grades count as much as common ones; the same reading of the real slices,
        balanced over the grades they have, is the reader's ceiling)."""
        assert data.test_condition is not None
        n = self.params.eval_samples
        burden = data.test_condition[torch.arange(n) % len(data.test_condition)]
        fake = self.sample(n, seed=self.config.seed + 7919, conditions=self.encode(burden))
        reader = load_feature_net(device=self.device)
        metrics = self.distribution_metrics(fake, data.test, reader)
        asked = torch.tensor(PREVIEW_BURDENS).repeat(max(1, n // len(PREVIEW_BURDENS)))
        generated = self.sample(len(asked), seed=self.config.seed + 7927, conditions=self.encode(asked))
        read_fake = reader.read_burden(generated.to(self.device)).cpu()
        read_real = reader.read_burden(data.test.to(self.device)).cpu()
        if self.params.condition == "grade":
            metrics["grade-accuracy"] = balanced_accuracy(burden_grade(read_fake), burden_grade(asked))
            metrics["grade-accuracy-real"] = balanced_accuracy(burden_grade(read_real), burden_grade(data.test_condition))
        else:
            metrics["severity-mae"] = float((read_fake - asked).abs().mean())
            metrics["severity-mae-real"] = float((read_real - data.test_condition).abs().mean())
        return metrics

    def preview(self, n: int) -> torch.Tensor:
        """One row per grade (a burden of PREVIEW_BURDENS), ``preview_columns`` samples each."""
        per_row = self.preview_columns
        burdens = torch.tensor(PREVIEW_BURDENS).repeat_interleave(per_row)
        return self.sample(len(burdens), seed=self.config.seed + 104729, conditions=self.encode(burdens))
