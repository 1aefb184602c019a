"""Conditional synthesis (cGAN on lesion-burden grade): does it learn, does it follow the
condition, and does it help a classifier of the rare grades?

    python benchmarks/conditional_augmentation.py [--out benchmarks/results/conditional] [--rounds 5] [--local-steps 150] [--seeds 3]

Three simulated hospitals with different lesion prevalence and severity; each slice's
condition is its lesion-burden grade (0 none, 1 ≤ 5 % of the liver, 2 ≤ 15 %, 3 more)
from the label maps. The `conditional` task trains in Flower's simulation engine (no
DP, 64×64, width 32). Reported:

1. Per round, every round's global model evaluated at each site as the sites do
   (sample-weighted mean): FID and KID on the project's phantom feature network, patch
   SWD, and grade accuracy — how often the feature network's lesion segmenter reads the
   grade asked for in generated slices (balanced over the 4 grades), beside the same
   reading of the real held-out slices (the reader's ceiling).
2. Augmentation: per site, a small grade classifier trained on the site's own training
   slices, and on those plus 64 generated slices of each grade from the federated model
   (class-balanced batches either way); balanced accuracy on 20 new phantom subjects per
   hospital (simulated for the test only: the sites' own test splits hold too few
   lesion slices to score rare grades). Beside it, two classifiers that need fewer
   examples: a linear probe on the phantom feature network's 96 features, for the 4 grades
   and for lesion present vs absent, each on own slices and with the generated ones.
`--reuse` skips training when the run folder already has its final checkpoint.
Writes results.json and results.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import arguments, fit_cross_entropy, study_sites, trained_or_reused
from medgan_core.config import TaskConfig
from medgan_core.study_config import StudyConfig
from medgan_core.data.dataset import labelled_slices
from medgan_core.data.labels import lesion_burden
from medgan_core.data.simulate import find_sites, simulate_study
from medgan_core.metrics.features import N_GRADES, PhantomFeatureNet, burden_grade, load_feature_net
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.conditional import balanced_accuracy
from medgan_core.tasks.registry import load_task_data
from medgan_core.checkpoints import load_checkpoint

SYNTHETIC_PER_GRADE = 64
MEASURES = ("balanced_accuracy_real", "balanced_accuracy_augmented", "cnn_training_accuracy_real", "probe_grade_real",
            "probe_grade_augmented", "probe_present_real", "probe_present_augmented")


def _mean_sd(values: list[float]) -> dict[str, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(tensor.mean()), "sd": float(tensor.std()) if len(values) > 1 else 0.0, "runs": values}


def _cell(value: dict[str, float], signed: bool = False) -> str:
    return f"{value['mean']:{'+' if signed else ''}.3f} ± {value['sd']:.3f}"


class GradeClassifier(torch.nn.Module):
    """A small CNN: four stride-2 convolutions, mean- and max-pooled, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64), (64, 64)):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, 2, 1), torch.nn.GroupNorm(8, c_out), torch.nn.LeakyReLU(0.2)]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(128, N_GRADES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.body(images)
        return self.head(torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1))


def train_classifier(images: torch.Tensor, grades: torch.Tensor, steps: int = 600, seed: int = 0) -> GradeClassifier:
    """Trained from scratch on (image, grade) pairs, each grade equally often per batch."""
    torch.manual_seed(seed)
    net = GradeClassifier()
    weights = 1.0 / torch.bincount(grades, minlength=N_GRADES).clamp(min=1).float()[grades]
    return fit_cross_entropy(net, images, grades, steps, seed,  # type: ignore[return-value]
                             lambda g: torch.multinomial(weights, 32, replacement=True, generator=g))


@torch.no_grad()
def classifier_accuracy(net: GradeClassifier, images: torch.Tensor, grades: torch.Tensor) -> float:
    return balanced_accuracy(net(images).argmax(1), grades)


def probe_accuracy(features: PhantomFeatureNet, images: torch.Tensor, labels: torch.Tensor,
                   test_images: torch.Tensor, test_labels: torch.Tensor, steps: int = 2000, seed: int = 0) -> float:
    """Balanced accuracy of a class-weighted logistic regression on the frozen feature network's
    features (standardised on the training set): a reader that needs few examples per class."""
    with torch.no_grad():
        train_f, test_f = features.features(images), features.features(test_images)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    classes = int(max(labels.max(), test_labels.max())) + 1
    torch.manual_seed(seed)
    linear = torch.nn.Linear(train_f.shape[1], classes)
    weight = 1.0 / torch.bincount(labels, minlength=classes).clamp(min=1).float()
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(linear((train_f - mean) / std), labels, weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return balanced_accuracy(linear((test_f - mean) / std).argmax(1), test_labels)


def held_out_subjects(task: TaskConfig, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice of 20 new phantom subjects per hospital profile, with their grades."""
    if not (folder / "study.json").exists():
        simulate_study(folder, n_sites=3, n_subjects=20, n_slices=12, size=128, seed=77)
    images, grades = [], []
    for site in find_sites(folder):
        for split in ("train", "val", "test"):
            x, labels = labelled_slices(site, task, split)
            images.append(x)
            grades.append(burden_grade(torch.from_numpy(lesion_burden(labels.numpy().astype("uint8")))))
    return torch.cat(images), torch.cat(grades)


def round_curve(study: StudyConfig, sites: list[Path], run_dir: Path) -> list[dict[str, float]]:
    """Each round's global model evaluated at every site; sample-weighted means."""
    datas = [load_task_data(site, study.task) for site in sites]
    weights = [len(d.test) for d in datas]
    curve = []
    for r in range(study.run.rounds + 1):
        task = build_task(study.task)
        task.set_weights(load_checkpoint(run_dir / "checkpoints" / f"round-{r:03d}.safetensors")[0])
        per_site = [task.evaluate(d) for d in datas]
        curve.append({"round": r, **{k: sum(m[k] * w for m, w in zip(per_site, weights)) / sum(weights)
                                     for k in per_site[0]}})
        print(json.dumps(curve[-1]), flush=True)
    return curve


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/conditional", local_steps=150,
                     reuse_help="reuse a finished run in OUT/run", seeds=3)
    sites = study_sites(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    study = StudyConfig().replace(
        run={"rounds": args.rounds, "num_sites": len(sites), "device": "cpu"},
        task={"name": "conditional", "condition": "grade", "local_steps": args.local_steps, "eval_samples": 256},
        privacy={"enabled": False},
    )
    task, seconds = trained_or_reused(args, study, sites)
    curve = round_curve(study, sites, args.out / "run")

    started = time.monotonic()
    datas = [load_task_data(site, study.task) for site in sites]
    test_images, test_grades = held_out_subjects(study.task, args.data.parent / "held-out-subjects")
    wanted = torch.arange(N_GRADES).repeat_interleave(SYNTHETIC_PER_GRADE)
    features = load_feature_net()
    rows = []
    present = lambda g: (g > 0).long()  # noqa: E731
    for site, data in zip(sites, datas):
        grades = burden_grade(data.train_condition)
        counts = [int((grades == g).sum()) for g in range(N_GRADES)]
        runs: dict[str, list[float]] = {key: [] for key in MEASURES}
        for seed in range(args.seeds):  # the generated slices, the classifiers' init and batches all move
            synthetic = task.sample(len(wanted), seed=12345 + seed, conditions=F.one_hot(wanted, N_GRADES).float())
            with_generated = torch.cat([data.train, synthetic]), torch.cat([grades, wanted])
            real_only = train_classifier(data.train, grades, seed=seed)
            augmented = train_classifier(*with_generated, seed=seed)
            values = {
                "balanced_accuracy_real": classifier_accuracy(real_only, test_images, test_grades),
                "balanced_accuracy_augmented": classifier_accuracy(augmented, test_images, test_grades),
                "cnn_training_accuracy_real": classifier_accuracy(real_only, data.train, grades),
                "probe_grade_real": probe_accuracy(features, data.train, grades, test_images, test_grades, seed=seed),
                "probe_grade_augmented": probe_accuracy(features, *with_generated, test_images, test_grades,
                                                        seed=seed),
                "probe_present_real": probe_accuracy(features, data.train, present(grades), test_images,
                                                     present(test_grades), seed=seed),
                "probe_present_augmented": probe_accuracy(features, with_generated[0], present(with_generated[1]),
                                                          test_images, present(test_grades), seed=seed)}
            for key, value in values.items():
                runs[key].append(value)
        rows.append({"site": site.name, "train_slices_per_grade": counts, "seeds": args.seeds,
                     **{key: _mean_sd(v) for key, v in runs.items()},
                     **{f"gain_{name}": _mean_sd([a - r for a, r in zip(runs[f"{name}_augmented"], runs[f"{name}_real"])])
                        for name in ("balanced_accuracy", "probe_grade", "probe_present")}})
        print(json.dumps(rows[-1]), flush=True)
    aug_seconds = time.monotonic() - started
    test_counts = [int((test_grades == g).sum()) for g in range(N_GRADES)]
    (args.out / "results.json").write_text(json.dumps(
        {"curve": curve, "augmentation": rows, "test_slices_per_grade": test_counts, "train_seconds": seconds,
         "augmentation_seconds": aug_seconds}, indent=2))
    lines = ["# Conditional synthesis on lesion-burden grade (cGAN)", "",
             f"3 simulated hospitals, {args.rounds} rounds × {args.local_steps} local steps, 64×64, width 32, no DP. "
             f"Training time on 2 CPU cores: {seconds / 60:.1f} min (augmentation study {aug_seconds:.0f} s). Command: "
             f"`python benchmarks/conditional_augmentation.py --rounds {args.rounds} --local-steps {args.local_steps} "
             f"--seeds {args.seeds}`.",
             "", "Held-out metrics per round (sample-weighted mean over sites; FID/KID on the phantom feature network, "
             "see medgan_core/metrics/features.py):", "",
             "| round | FID | KID | SWD | grade accuracy, generated (balanced) | grade accuracy, real held-out slices (reader's ceiling) |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['round']} | {c['fid']:.2f} | {c['kid']:.4f} | {c['swd']:.3f} | {c['grade-accuracy']:.3f} | "
              f"{c['grade-accuracy-real']:.3f} |" for c in curve]
    lines += ["", f"Augmentation: grade classifier per site (class-balanced batches), tested on every slice of 20 new "
              f"phantom subjects per hospital profile (slices per grade 0-3: {test_counts}); "
              f"{SYNTHETIC_PER_GRADE} generated slices per grade added. Each cell is the mean ± standard deviation "
              f"over {args.seeds} seeds (the generated slices, the classifiers' initialisation and batches); the "
              "gain is augmented minus own, paired by seed.", "",
              "Balanced accuracy on those slices (chance: 0.25 for grades, 0.5 for present/absent):", "",
              "| site | training slices per grade 0-3 | CNN, own slices (its training accuracy) | + generated | gain "
              "| feature probe, grade: own | + generated | gain | feature probe, lesion present: own | + generated "
              "| gain |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} | {r['train_slices_per_grade']} | {_cell(r['balanced_accuracy_real'])} "
              f"({r['cnn_training_accuracy_real']['mean']:.2f}) | {_cell(r['balanced_accuracy_augmented'])} | "
              f"{_cell(r['gain_balanced_accuracy'], True)} | {_cell(r['probe_grade_real'])} | "
              f"{_cell(r['probe_grade_augmented'])} | {_cell(r['gain_probe_grade'], True)} | "
              f"{_cell(r['probe_present_real'])} | {_cell(r['probe_present_augmented'])} | "
              f"{_cell(r['gain_probe_present'], True)} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
