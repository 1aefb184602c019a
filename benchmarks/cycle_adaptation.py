"""Scanner harmonisation (CycleGAN, unpaired) and the proof that it helps a segmenter.

    python benchmarks/cycle_adaptation.py [--out benchmarks/results/cycle] [--rounds 5] [--local-steps 240] [--reuse]

Three simulated hospitals each run a main CT scanner (A) and the same older model as a
second one (B: lower dose, another kernel, reading 35 to 55 HU too high with an 8-12 %
gain error — how much differs per site). The `cycle` task trains in Flower's simulation
engine (no DP, generator and discriminator learning rate 1e-3) on 32×32 crops of
scanner-A and scanner-B images of disjoint subjects; each hospital keeps its own output
calibration and discriminator (``TASK``, ``AGGREGATION``). Then:

1. Image scores of every site's held-out scanner-B slices against the same subjects'
   scanner-A slices (which training never paired): raw B, B histogram-matched to the
   site's own scanner-A training images (the per-site intensity mapping a group would
   otherwise use), and B harmonised by the federated generator.
2. Adaptation: a small U-Net segmenter (liver, kidneys, fat) trained on hospital A's
   scanner-A images only, applied to each site's held-out scanner-B slices raw,
   histogram-matched and harmonised (by the site's own model: the shared generators with
   the site's calibration); mean Dice over the three structures. The same
   segmenter on the site's scanner-A slices of those subjects is the reference.
3. A re-scan reference: new phantom subjects of each hospital's build imaged on its
   scanner A twice (independent quantum noise) and on its scanner B once. The second
   scanner-A image is what a perfect harmoniser could output — the right appearance,
   other noise — so its scores against the first are what a perfect harmoniser would
   score (only one that also removed noise could do better); raw, histogram-matched and
   harmonised scanner B are scored the same way.
Writes results.json and results.md. `--reuse` scores OUT/run's final checkpoint again
instead of training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench_common import (arguments, fit_cross_entropy, image_scores, paired_study, site_models, study_sites,
                          trained_or_reused)
from medgan_core.config import TaskConfig
from medgan_core.data.dataset import labelled_slices
from medgan_core.data.simulate import FAT, KIDNEY, LESION, LIVER, phantom_scanner_series, site_profile
from medgan_core.models.unet import ResidualUNet
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import load_task_data
from translate_baselines import histogram_matched

STRUCTURES = {1: "liver", 2: "kidneys", 3: "fat"}
RESCAN_SUBJECTS, RESCAN_SLICES = 4, 12
HIST, GAN = "B histogram-matched to the site's A", "B harmonised by CycleGAN (federated)"
LOWER_IS_BETTER = {"mae_hu"}
#: Training on 32² crops (a quarter of the cost per step of 64² slices, so 4× the steps in
#: the same time); identity loss off (see the README for why); both learning rates decayed
#: over the rounds (cosine), which calms the GAN's round-to-round swings at the end; the cycle
#: loss on 2×2-pooled images and a total-variation term, so hospital C's noisy main scanner's
#: noise is not copied into the output (README: why C needed them).
TASK = {"crop_size": 32, "identity_weight": 0.0, "lr_schedule": "cosine", "cycle_pool": 2, "tv_weight": 2.0}
#: Each hospital keeps its own output calibration and its own discriminator.
AGGREGATION = {"local_calibration": True, "group_policies": "discriminator=local"}
BODY = -1.0 + 1e-3  # windowed intensities above this are inside the body (air and the outside sit at -1)


def describe(settings: dict[str, object]) -> str:
    """``{"local_calibration": True}`` -> ``local-calibration = true``, as in a study's TOML."""
    return ", ".join(f"{k.replace('_', '-')} = {str(v).lower() if isinstance(v, bool) else repr(v)}"
                     for k, v in settings.items())


def structure_labels(tissue: torch.Tensor) -> torch.Tensor:
    """Tissue labels -> 0 other, 1 liver (with its lesions), 2 kidneys, 3 fat."""
    out = torch.zeros_like(tissue)
    out[(tissue == LIVER) | (tissue == LESION)] = 1
    out[tissue == KIDNEY] = 2
    out[tissue == FAT] = 3
    return out


def train_segmenter(images: torch.Tensor, labels: torch.Tensor, steps: int = 1200, seed: int = 0) -> ResidualUNet:
    """A 4-class U-Net (the residual input adds the same value to every logit: no effect)."""
    torch.manual_seed(seed)
    net = ResidualUNet(16, channels=len(STRUCTURES) + 1, in_channels=1)
    torch.nn.init.normal_(net.out.weight, 0, 0.01)
    return fit_cross_entropy(net, images, labels, steps, seed,  # type: ignore[return-value]
                             lambda g: torch.randint(0, len(images), (16,), generator=g))


@torch.no_grad()
def mean_dice(net: ResidualUNet, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predicted = net(images).argmax(1)
    dice = {}
    for label, name in STRUCTURES.items():
        p, t = predicted == label, labels == label
        dice[name] = float(2 * (p & t).sum() / max(int(p.sum() + t.sum()), 1))
    dice["mean"] = sum(dice.values()) / len(STRUCTURES)
    return dice


def body_mean_error_hu(output: torch.Tensor, target: torch.Tensor, hu_per_unit: float) -> float:
    """Signed mean error inside the body, in HU: the calibration offset left in the output
    (positive reads too high). Unpaired training has to infer it from disjoint subjects."""
    body = target > BODY
    return float((output.clamp(-1, 1) - target)[body].mean()) * hu_per_unit


def harmonisation_scores(output: torch.Tensor, target: torch.Tensor, hu_per_unit: float) -> dict[str, float]:
    """The image scores of bench_common plus the calibration offset left in the output."""
    return {**image_scores(output, target, hu_per_unit), "mean_error_hu": body_mean_error_hu(output, target, hu_per_unit)}


def rescan_rows(task: Task, config: TaskConfig, site: Path, reference_a: torch.Tensor, hu: float) -> list[dict]:
    """Scores against scanner A of new subjects of ``site``'s build: its scanner B raw,
    histogram-matched to ``reference_a`` and harmonised, and a second scanner-A acquisition."""
    profile = site_profile(site)
    main_scanner, second_scanner = profile.scanners()
    series = [phantom_scanner_series(RESCAN_SLICES, config, profile, [main_scanner, main_scanner, second_scanner],
                                     seed=90_000 + 100 * i, lesion_severity=profile.lesion_severity)
              for i in range(RESCAN_SUBJECTS)]
    scan_a, rescan_a, scan_b = (torch.cat([s[k] for s in series]) for k in range(3))
    methods = {
        "scanner B, raw": scan_b,
        HIST: histogram_matched(scan_b, reference_a),
        GAN: task.restore(scan_b),
        "scanner A re-scan (a perfect harmoniser)": rescan_a,
    }
    return [{"site": site.name, "method": m, "test_slices": len(x), **harmonisation_scores(x, scan_a, hu)}
            for m, x in methods.items()]


def wins(rows: list[dict], scores: dict[str, str]) -> list[str]:
    """Per site, the scores on which the harmonised images beat histogram matching and those
    on which they do not: the verdict, computed rather than written by hand."""
    lines = []
    for site in dict.fromkeys(r["site"] for r in rows):
        by = {r["method"]: r for r in rows if r["site"] == site}
        better = [name for key, name in scores.items()
                  if (by[HIST][key] - by[GAN][key] if key in LOWER_IS_BETTER else by[GAN][key] - by[HIST][key]) > 0]
        worse = [name for name in scores.values() if name not in better]
        lines.append(f"- {site}: CycleGAN beats histogram matching on {', '.join(better) or 'nothing'}"
                     + (f"; not on {', '.join(worse)}" if worse else ""))
    return lines


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/cycle", local_steps=240,
                     reuse_help="score OUT/run's final checkpoint again")
    sites = study_sites(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    study = paired_study(args, sites, name="cycle", lr_generator=1e-3, lr_discriminator=1e-3,
                         **TASK).replace(aggregation=AGGREGATION)
    trained, seconds = trained_or_reused(args, study, sites)
    models = site_models(study, sites, args.out / "run", trained)  # each with its own calibration
    hu = (study.task.window_high - study.task.window_low) / 2

    started = time.monotonic()
    seg_images, seg_tissue = labelled_slices(sites[0], study.task, "train")
    segmenter = train_segmenter(seg_images, structure_labels(seg_tissue))
    seg_seconds = time.monotonic() - started

    rows, rescan = [], []
    for site, task in zip(sites, models):
        data = load_task_data(site, study.task)
        assert data.test_input is not None
        split = "test"
        scanner_b, tissue = labelled_slices(site, study.task, split, variant="scanner-b")
        scanner_a, _ = labelled_slices(site, study.task, split)
        truth = structure_labels(tissue)
        methods = {
            "scanner B, raw": scanner_b,
            HIST: histogram_matched(scanner_b, data.train),
            GAN: task.restore(scanner_b),
            "scanner A, same subjects (reference)": scanner_a,
        }
        for method, images in methods.items():
            dice = mean_dice(segmenter, images, truth)
            rows.append({"site": site.name, "method": method, "test_slices": len(images),
                         **harmonisation_scores(images, scanner_a, hu),
                         **{f"dice_{k}": v for k, v in dice.items()}})
            print(json.dumps(rows[-1]), flush=True)
        rescan += rescan_rows(task, study.task, site, data.train, hu)
    (args.out / "results.json").write_text(json.dumps(
        {"rows": rows, "rescan_rows": rescan, "train_seconds": seconds, "segmenter_seconds": seg_seconds}, indent=2))
    lines = ["# Scanner B → scanner A harmonisation (CycleGAN, unpaired) and a segmenter trained on hospital A",
             "",
             f"3 simulated hospitals, {args.rounds} rounds × {args.local_steps} local steps, 64×64 slices, "
             f"`{describe({**TASK, **AGGREGATION})}`, "
             f"window [{study.task.window_low:g}, {study.task.window_high:g}] HU, lr 1e-3, no DP. Training time on 2 CPU cores: "
             f"{seconds / 60:.1f} min (segmenter {seg_seconds:.0f} s). Command: `python benchmarks/cycle_adaptation.py "
             f"--rounds {args.rounds} --local-steps {args.local_steps}`.",
             "",
             "Image scores compare each held-out scanner-B slice with the same subject's scanner-A slice (never "
             "paired in training). Mean error: the signed mean of output − A inside the body, the calibration "
             "offset left (positive reads too high). Dice: a U-Net trained on hospital A's scanner-A training "
             "images only.",
             "",
             "| site | input to the segmenter | MAE vs A (HU) | mean error (HU) | PSNR vs A (dB) | SSIM vs A | "
             "Dice liver | Dice kidneys | Dice fat | mean Dice |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} | {r['method']} | {r['mae_hu']:.1f} | {r['mean_error_hu']:+.1f} | {r['psnr']:.2f} | "
              f"{r['ssim']:.3f} | "
              f"{r['dice_liver']:.3f} | {r['dice_kidneys']:.3f} | {r['dice_fat']:.3f} | {r['dice_mean']:.3f} |"
              for r in rows]
    lines += ["", *wins(rows, {"mae_hu": "MAE", "psnr": "PSNR", "ssim": "SSIM", "dice_mean": "mean Dice"})]
    lines += ["", f"Re-scan reference: {RESCAN_SUBJECTS} new phantom subjects × {RESCAN_SLICES} slices per hospital, "
              "each imaged on the site's scanner A twice and scanner B once; every row is scored against the first "
              "scanner-A image.", "",
              "| site | image | MAE vs A (HU) | mean error (HU) | PSNR vs A (dB) | SSIM vs A |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} | {r['method']} | {r['mae_hu']:.1f} | {r['mean_error_hu']:+.1f} | {r['psnr']:.2f} | "
              f"{r['ssim']:.3f} |"
              for r in rescan]
    lines += ["", *wins(rescan, {"mae_hu": "MAE", "psnr": "PSNR", "ssim": "SSIM"})]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
