"""Scanner harmonisation (CycleGAN, unpaired) at clinical resolution, and the proof that it
helps a segmenter.

    python benchmarks/cycle_adaptation.py [--out benchmarks/results/cycle] [--rounds 5] [--local-steps 240] [--reuse]

Three simulated hospitals each run a main CT scanner (A) and the same older model as a
second one (B: lower dose, another kernel, reading 35 to 55 HU too high with an 8-12 %
gain error — how much differs per site), both 512×512 over 400 mm (0.78 mm pixels). The
`cycle` task trains in Flower's simulation engine (no DP, generator and discriminator
learning rate 1e-3) on 32×32 patches at those pixels, over the whole CT range, of
scanner-A and scanner-B images of disjoint subjects; each hospital keeps its own output
calibration and discriminator, and both generators start from the site's own histogram
matching of B to A (``TASK``, ``AGGREGATION``). Then, on whole held-out slices:

1. Image scores of every site's held-out scanner-B slices against the same subjects'
   scanner-A slices (which training never paired): raw B, B histogram-matched inside the
   body to the site's own scanner-A training images (the per-site intensity mapping a group
   would otherwise use), and B harmonised by the federated generator, with the CPU seconds per
   512×512 slice each takes.
2. Adaptation: a small U-Net segmenter (liver, kidneys, fat) trained on hospital A's
   scanner-A images only, at its own coarser grid (``SEGMENTER_MM``, the soft-tissue
   window: a segmenter resamples what it is given), applied to each site's held-out
   scanner-B slices raw, histogram-matched and harmonised (by the site's own model: the
   shared generators with the site's calibration); mean Dice over the three structures.
   The same segmenter on the site's scanner-A slices of those subjects is the reference.
   Each site's own segmenter too, trained the same way on its own scanner-A training
   images: the harmoniser maps B to the site's own scanner A, so this is the segmenter it
   serves; hospital A's, at B and C, also meets the shift between hospitals, which no
   B → A harmoniser of theirs removes.
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
import torch.nn.functional as F

from bench_common import (CLINICAL_WINDOW, arguments, clinical_scores, clinical_sites, fit_cross_entropy, paired_study,
                          site_models, timed, trained_or_reused)
from medgan_core.config import TaskConfig
from medgan_core.data.dataset import labelled_slices
from medgan_core.data.preprocess import CT_FULL_RANGE, resample_to, to_hu, window_ct
from medgan_core.data.simulate import FAT, KIDNEY, LESION, LIVER, phantom_scanner_series, site_profile
from medgan_core.metrics.image_quality import BODY_THRESHOLD_HU
from medgan_core.models.unet import ResidualUNet
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import load_task_data
from skimage.exposure import match_histograms

STRUCTURES = {1: "liver", 2: "kidneys", 3: "fat"}
RESCAN_SUBJECTS, RESCAN_SLICES = 3, 8
HIST, GAN = "B histogram-matched to the site's A inside the body", "B harmonised by CycleGAN (federated)"
LOWER_IS_BETTER = {"mae-hu"}
#: 32² patches at the scans' 0.78 mm (25 mm of anatomy: a scanner's calibration, noise and
#: kernel are local; 64² with half the steps scored no better); identity loss off (it asks
#: the scanner-B-to-A generator to leave scanner-A images as they are, which pulls the site's
#: calibration towards none; on the old 64² slices weight 5 collapsed towards raw scanner B);
#: both learning rates decayed over the rounds (cosine), which calms the GAN's round-to-round
#: swings at the end; the cycle loss on 2×2-pooled images and a light total-variation term, so
#: hospital C's noisy main scanner's noise is not copied into the output (tv-weight 2, now
#: counted over both views, smoothed more and let the calibration drift by 16-28 HU); the
#: generators start from the site's histogram matching (without it the GAN lost every score at
#: hospital B to the matching it now starts from).
TASK = {"image_size": 32, "identity_weight": 0.0, "lr_schedule": "cosine", "cycle_pool": 2, "tv_weight": 0.5,
        "histogram_start": True}
#: Each hospital keeps its own output calibration and its own discriminator.
AGGREGATION = {"local_calibration": True, "group_policies": "discriminator=local"}
#: The segmenter's grid: 64×64 over the 400 mm field, in the soft-tissue window (the
#: harmonised 0.78 mm slices are resampled to it, as a segmentation pipeline would).
SEGMENTER_MM, SEGMENTER_SIZE = 6.25, 64


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


def site_segmenter(site: Path, config: TaskConfig) -> ResidualUNet:
    """A segmenter trained on ``site``'s own scanner-A training slices and their labels."""
    images, tissue = labelled_slices(site, config, "train", clinical=True)
    return train_segmenter(segmenter_view(images), segmenter_labels(structure_labels(tissue)))


@torch.no_grad()
def mean_dice(net: ResidualUNet, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predicted = net(images).argmax(1)
    dice = {}
    for label, name in STRUCTURES.items():
        p, t = predicted == label, labels == label
        dice[name] = float(2 * (p & t).sum() / max(int(p.sum() + t.sum()), 1))
    dice["mean"] = sum(dice.values()) / len(STRUCTURES)
    return dice


def body_mean_error_hu(output: torch.Tensor, target: torch.Tensor) -> float:
    """Signed mean error inside the body, in HU: the calibration offset left in the output
    (positive reads too high). Unpaired training has to infer it from disjoint subjects."""
    low, high = CT_FULL_RANGE
    hu_out, hu_target = (to_hu(x.clamp(-1, 1).numpy(), low, high) for x in (output, target))
    body = hu_target > BODY_THRESHOLD_HU
    return float((hu_out - hu_target)[body].mean())


def harmonisation_scores(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The clinical scores of bench_common plus the calibration offset left in the output."""
    return {**clinical_scores(output, target), "mean-error-hu": body_mean_error_hu(output, target)}


def body_histogram_matched(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The pixels inside the body (above ``BODY_THRESHOLD_HU``) mapped onto the distribution of
    the reference's body pixels (scikit-image), air left as it is: the per-site intensity
    mapping a group would use. Matching whole slices instead maps body onto air wherever the
    slices' share of air differs from the reference's (at hospital A: −136 HU inside the body)."""
    level = (BODY_THRESHOLD_HU - CT_FULL_RANGE[0]) / (CT_FULL_RANGE[1] - CT_FULL_RANGE[0]) * 2 - 1
    out = images.clone()
    body = images > level
    matched = match_histograms(images[body].numpy(), reference[reference > level].numpy())
    out[body] = torch.from_numpy(matched).float()
    return out


def segmenter_view(images: torch.Tensor) -> torch.Tensor:
    """Whole-range CT slices as the segmenter reads them: in the soft-tissue window, on its grid."""
    windowed = torch.from_numpy(window_ct(to_hu(images.numpy(), *CT_FULL_RANGE), *CLINICAL_WINDOW))
    return resample_to(windowed, (SEGMENTER_SIZE, SEGMENTER_SIZE))


def segmenter_labels(labels: torch.Tensor) -> torch.Tensor:
    """Structure labels on the segmenter's grid (nearest neighbour)."""
    grid = F.interpolate(labels[:, None].float(), size=(SEGMENTER_SIZE, SEGMENTER_SIZE), mode="nearest-exact")
    return grid[:, 0].long()


def rescan_rows(task: Task, config: TaskConfig, site: Path, reference_a: torch.Tensor) -> list[dict]:
    """Scores against scanner A of new subjects of ``site``'s build: its scanner B raw,
    histogram-matched to ``reference_a`` and harmonised, and a second scanner-A acquisition."""
    profile = site_profile(site)
    main_scanner, second_scanner = profile.scanners()
    series = [phantom_scanner_series(RESCAN_SLICES, config, profile, [main_scanner, main_scanner, second_scanner],
                                     seed=90_000 + 100 * i, lesion_severity=profile.lesion_severity, clinical=True)
              for i in range(RESCAN_SUBJECTS)]
    scan_a, rescan_a, scan_b = (torch.cat([s[k] for s in series]) for k in range(3))
    methods = {
        "scanner B, raw": scan_b,
        HIST: body_histogram_matched(scan_b, reference_a),
        GAN: task.restore(scan_b),
        "scanner A re-scan (a perfect harmoniser)": rescan_a,
    }
    return [{"site": site.name, "method": m, "test_slices": len(x), **harmonisation_scores(x, scan_a)}
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
    args = arguments(__doc__, "benchmarks/results/cycle", data="benchmarks/data/cycle-native", local_steps=240,
                     reuse_help="score OUT/run's final checkpoint again")
    torch.set_num_threads(2)
    sites = clinical_sites(args.data, ("ct", "ct-scanner-b", "seg"))
    args.out.mkdir(parents=True, exist_ok=True)
    study = paired_study(args, sites, aggregation=AGGREGATION, name="cycle", lr_generator=1e-3, lr_discriminator=1e-3,
                         **TASK)
    trained, seconds = trained_or_reused(args, study, sites)
    models = site_models(study, sites, args.out / "run", trained)  # each with its own calibration

    started = time.monotonic()
    own_segmenters = [site_segmenter(site, study.task) for site in sites]
    segmenter = own_segmenters[0]  # hospital A's, as every site's shared reading
    seg_seconds = (time.monotonic() - started) / len(sites)

    rows, rescan = [], []
    for site, task, own_segmenter in zip(sites, models, own_segmenters):
        data = load_task_data(site, study.task)
        scanner_b, tissue = labelled_slices(site, study.task, "test", variant="scanner-b", clinical=True)
        scanner_a, _ = labelled_slices(site, study.task, "test", clinical=True)
        truth = segmenter_labels(structure_labels(tissue))
        methods = {
            "scanner B, raw": (scanner_b, 0.0),
            HIST: timed(lambda: body_histogram_matched(scanner_b, data.train), len(scanner_b)),
            GAN: timed(lambda: task.restore(scanner_b), len(scanner_b)),
            "scanner A, same subjects (reference)": (scanner_a, 0.0),
        }
        for method, (images, cpu) in methods.items():
            view = segmenter_view(images)
            dice, own = mean_dice(segmenter, view, truth), mean_dice(own_segmenter, view, truth)
            rows.append({"site": site.name, "method": method, "test_slices": len(images), "cpu_s_per_slice": cpu,
                         **harmonisation_scores(images, scanner_a), **{f"dice_{k}": v for k, v in dice.items()},
                         **{f"own_dice_{k}": v for k, v in own.items()}})
            print(json.dumps(rows[-1]), flush=True)
        rescan += rescan_rows(task, study.task, site, data.train)
    (args.out / "results.json").write_text(json.dumps(
        {"rows": rows, "rescan_rows": rescan, "train_seconds": seconds, "segmenter_seconds": seg_seconds}, indent=2))
    size = tuple(scanner_a.shape[-2:])
    lines = ["# Scanner B → scanner A harmonisation (CycleGAN, unpaired) at clinical resolution, and a segmenter "
             "trained on hospital A",
             "",
             f"3 simulated hospitals, CT {size[0]}×{size[1]} over 400 mm (0.78 mm pixels); {args.rounds} rounds × "
             f"{args.local_steps} local steps on {TASK['image_size']}×{TASK['image_size']} patches at those pixels, "
             f"CT over its whole range, `{describe({**TASK, **AGGREGATION})}`, lr 1e-3, no DP; whole held-out slices "
             f"harmonised as blended tiles. Training time on 2 CPU cores: {seconds / 60:.1f} min (segmenter "
             f"{seg_seconds:.0f} s a segmenter). Command: `python benchmarks/cycle_adaptation.py --rounds {args.rounds} "
             f"--local-steps {args.local_steps}`.",
             "",
             "Image scores compare each held-out scanner-B slice with the same subject's scanner-A slice (never "
             "paired in training). PSNR: whole CT range (data range 4095 HU); PSNR-W and SSIM: soft-tissue window "
             "[-160, 240] HU; MAE: HU inside the body, bone included. Mean error: the signed mean of output − A "
             "inside the body, the calibration offset left (positive reads too high). CPU s: CPU seconds per "
             f"{size[0]}×{size[1]} slice. Dice: a U-Net trained on hospital A's scanner-A training images only, "
             f"reading each image in the window on a {SEGMENTER_SIZE}×{SEGMENTER_SIZE} grid ({SEGMENTER_MM} mm); "
             "the last column: the same U-Net trained on the site's own scanner-A training images, the images "
             "the harmoniser maps scanner B to.",
             "",
             "| site | input to the segmenter | MAE vs A (HU) | mean error (HU) | PSNR vs A (dB) | PSNR-W vs A (dB) | "
             "SSIM vs A | CPU s | Dice liver | Dice kidneys | Dice fat | mean Dice | mean Dice, site's own segmenter |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} | {r['method']} | {r['mae-hu']:.1f} | {r['mean-error-hu']:+.1f} | {r['psnr']:.2f} | "
              f"{r['psnr-window']:.2f} | {r['ssim']:.3f} | {r['cpu_s_per_slice']:.2f} | "
              f"{r['dice_liver']:.3f} | {r['dice_kidneys']:.3f} | {r['dice_fat']:.3f} | {r['dice_mean']:.3f} | "
              f"{r['own_dice_mean']:.3f} |"
              for r in rows]
    scores = {"mae-hu": "MAE", "psnr": "PSNR", "psnr-window": "PSNR-W", "ssim": "SSIM"}
    lines += ["", *wins(rows, {**scores, "dice_mean": "mean Dice (hospital A's segmenter)",
                               "own_dice_mean": "mean Dice (the site's own segmenter)"})]
    lines += ["", f"Re-scan reference: {RESCAN_SUBJECTS} new phantom subjects × {RESCAN_SLICES} slices per hospital, "
              "each imaged on the site's scanner A twice and scanner B once; every row is scored against the first "
              "scanner-A image.", "",
              "| site | image | MAE vs A (HU) | mean error (HU) | PSNR vs A (dB) | PSNR-W vs A (dB) | SSIM vs A |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} | {r['method']} | {r['mae-hu']:.1f} | {r['mean-error-hu']:+.1f} | {r['psnr']:.2f} | "
              f"{r['psnr-window']:.2f} | {r['ssim']:.3f} |"
              for r in rescan]
    lines += ["", *wins(rescan, scores)]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
