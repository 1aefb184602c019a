"""Low-dose CT denoising at clinical resolution: the federated GAN against the filters a
radiology group would use, on whole 512×512 slices of 0.78 mm pixels.

    python benchmarks/denoise_baselines.py [--out benchmarks/results/denoise] [--rounds R] [--local-steps S]

Three simulated hospitals (doses, kernels, calibrations differ; 400 mm field of view at
512×512, FBP noise texture at that resolution; ``medgan_core.data.ct_noise``) train the
`denoise` task in Flower's simulation engine on 64×64 patches over the whole CT range,
with FedBN (each site keeps its normalisation layers). Every method is scored on whole
held-out slices of every site against the full-dose image: PSNR over the whole CT range
(-1024..3071 HU), PSNR and SSIM in the soft-tissue window, MAE in HU inside the body
(bone included). The classical methods are total variation (Chambolle), non-local means
(scikit-image) and BM3D (the ``bm3d`` package), each on the whole-range image with its
strength tuned per site for the whole-range PSNR on central 256×256 crops of that site's
*training* pairs (what a group would tune on its own images). Inference time is CPU
seconds per 512×512 slice. Writes results.json and results.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import bm3d
import numpy as np
import torch
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from bench_common import (
    CLINICAL_SIZE,
    CLINICAL_SLICES,
    CLINICAL_SUBJECTS,
    CLINICAL_TABLE,
    CLINICAL_WINDOW,
    clinical_row,
    clinical_scores,
    clinical_sites,
    site_models,
    timed,
)
from medgan.simulation import simulate_federation
from medgan_core.checkpoints import load_checkpoint
from medgan_core.config import AggregationConfig
from medgan_core.data.preprocess import CT_FULL_RANGE
from medgan_core.metrics.image_quality import ct_scores
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data

Filter = Callable[[np.ndarray, float], np.ndarray]
# Strengths in units of the whole-range scale (2 / 4095 per HU: 0.01 is about 20 HU); the grids
# reach past the values chosen on these sites so that no filter is held back by its grid.
FILTERS: dict[str, tuple[Filter, tuple[float, ...]]] = {
    "total-variation": (lambda img, p: denoise_tv_chambolle(img, weight=p),
                        (0.002, 0.004, 0.006, 0.01, 0.015, 0.02, 0.03, 0.045, 0.07, 0.1)),
    "non-local-means": (lambda img, p: denoise_nl_means(img, h=p, patch_size=5, patch_distance=6, fast_mode=True),
                        (0.005, 0.01, 0.015, 0.02, 0.03, 0.045, 0.07, 0.1, 0.14)),
    "bm3d": (lambda img, p: bm3d.bm3d(img, sigma_psd=p), (0.005, 0.01, 0.015, 0.02, 0.03, 0.045, 0.07, 0.1, 0.14)),
}
ROUNDS, LOCAL_STEPS = 40, 25  # 1000 local steps per site (1500 steps of one site alone: +0.18 dB over 600)
# Then each site's personal fine-tune (the low-noise site lost ~0.4 dB to federating), the best
# of it on the site's validation subject: from one 150-step check to the next its test PSNR
# moves by 0.1-0.3 dB either way, so a fixed length (300 or 600) always missed at one site.
FINETUNE_STEPS = 900
PATCH, WIDTH, BATCH = 64, 16, 16
L1_WEIGHT, LR = 1000.0, 4e-4
TUNE_SLICES, CROP = 4, 256  # tuning: central crops of a few training slices (BM3D takes ~7 s a whole slice)


def filtered(kind: str, images: torch.Tensor, param: float) -> torch.Tensor:
    fn = FILTERS[kind][0]
    return torch.from_numpy(np.stack([fn(img[0].numpy().astype(np.float64), param) for img in images])[:, None]).float()


def tune(kind: str, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The strength with the best whole-range PSNR on central crops of a few training pairs."""
    pick = torch.linspace(0, len(inputs) - 1, TUNE_SLICES).long()
    top, left = (inputs.shape[-2] - CROP) // 2, (inputs.shape[-1] - CROP) // 2
    crop = lambda x: x[pick, :, top : top + CROP, left : left + CROP]  # noqa: E731
    scores = {p: float(np.mean(ct_scores(filtered(kind, crop(inputs), p), crop(targets), CT_FULL_RANGE,
                                         CLINICAL_WINDOW)["psnr"]))
              for p in FILTERS[kind][1]}
    return max(scores, key=scores.get)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/denoise"))
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/denoise-native"))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--local-steps", type=int, default=LOCAL_STEPS)
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                        help="Each site's personal fine-tune after the last round (aggregation.finetune-steps).")
    parser.add_argument("--finetune-validate-every", type=int, default=AggregationConfig.finetune_validate_every,
                        help="Each site keeps the best of its fine-tune on its validation subject, scored every "
                             "this many steps (aggregation.finetune-validate-every; 0: the last).")
    parser.add_argument("--context-slices", type=int, default=0,
                        help="Neighbouring slices on each side the GAN reads beside each slice (task.context-slices).")
    parser.add_argument("--test-every", type=int, default=2, help="Score every Nth held-out slice (BM3D is slow).")
    parser.add_argument("--reuse", action="store_true", help="Evaluate the finished run in --out instead of training.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sites = clinical_sites(args.data, ("ct", "ct-low-dose"))
    args.out.mkdir(parents=True, exist_ok=True)
    study = StudyConfig().replace(
        # whole-slice evaluation each round would cost more than the training: rounds 0, 1 and the last only
        run={"rounds": args.rounds, "num_sites": len(sites), "device": "cpu", "evaluate_every": args.rounds},
        task={"name": "denoise", "width": WIDTH, "batch_size": BATCH, "image_size": PATCH, "spacing": 0.0,
              "local_steps": args.local_steps, "l1_weight": L1_WEIGHT, "lr_generator": LR, "lr_discriminator": LR,
              "context_slices": args.context_slices},
        privacy={"enabled": False},
        aggregation={"local_norm": True, "finetune_steps": args.finetune_steps,
                     "finetune_validate_every": args.finetune_validate_every},
    )
    run_dir = args.out / "run"
    final = run_dir / "checkpoints" / f"round-{args.rounds:03d}.safetensors"
    timing = run_dir / "train-seconds"
    if not (args.reuse and final.exists() and timing.exists()):
        started = time.monotonic()
        simulate_federation(study, sites, run_dir)
        timing.write_text(f"{time.monotonic() - started:.1f}\n")
    train_seconds = float(timing.read_text())
    trained = build_task(study.task)
    trained.set_weights(load_checkpoint(final)[0])
    models = site_models(study, sites, run_dir, trained)
    print(f"GAN trained in {train_seconds:.0f} s", flush=True)

    personal = ("" if not args.finetune_steps else f" + {args.finetune_steps}-step personal fine-tune)"
            if not args.finetune_validate_every else
            f" + personal fine-tune, best of {args.finetune_steps} steps on validation)")
    gan_label = "federated GAN (FedBN" + (personal or ")")
    if args.context_slices:
        gan_label += f", 2.5D: {args.context_slices} neighbouring slice{'s' if args.context_slices > 1 else ''} a side"
    rows, tuned = [], {}
    for index, site in enumerate(sites):
        data = load_task_data(site, study.task)
        assert data.test_input is not None and data.train_input is not None
        scored = torch.arange(0, len(data.test), args.test_every)
        inputs, targets = data.test_input[scored], data.test[scored]
        outputs: dict[str, tuple[torch.Tensor, float]] = {"quarter-dose input": (inputs, 0.0)}
        for kind in FILTERS:
            tuned[(site.name, kind)] = param = tune(kind, data.train_input, data.train)
            outputs[f"{kind} (tuned: {param:g})"] = timed(lambda: filtered(kind, inputs, param), len(inputs))
        outputs[gan_label] = timed(lambda: models[index].restore_series(data.test_input, data.test_series, scored),
                                   len(inputs))
        for method, (output, seconds) in outputs.items():
            rows.append({"site": site.name, "method": method, "test_slices": len(inputs), "cpu_s_per_slice": seconds,
                         **clinical_scores(output, targets)})
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{torch.get_num_threads()} torch threads; os.cpu_count() = {__import__('os').cpu_count()}"
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "train_seconds": train_seconds,
                                                       "machine": machine}, indent=2))
    command = (f"python benchmarks/denoise_baselines.py --rounds {args.rounds} --local-steps {args.local_steps} "
               f"--finetune-steps {args.finetune_steps} --finetune-validate-every {args.finetune_validate_every} "
               f"--test-every {args.test_every}" + (f" --context-slices {args.context_slices}" if args.context_slices
                                                     else ""))
    lines = [
        "# Low-dose CT denoising at clinical resolution: federated GAN vs classical filters", "",
        f"3 simulated hospitals, {CLINICAL_SUBJECTS} subjects × {CLINICAL_SLICES} slices each, "
        f"{CLINICAL_SIZE}×{CLINICAL_SIZE} over 400 mm (0.78 mm "
        f"pixels), quarter dose → full dose. GAN: {args.rounds} rounds × {args.local_steps} local steps, "
        f"{PATCH}×{PATCH} patches at the scans' own pixels over the whole CT range, width {WIDTH}, batch {BATCH}, "
        f"L1 weight {L1_WEIGHT:g}, lr {LR:g}, FedBN"
        + (f", then {args.finetune_steps} steps of personal fine-tune at each site (`aggregation.finetune-steps`; "
           "the filters are tuned per site too)" if args.finetune_steps else "")
        + (f", each site keeping the best of it on its own validation subject (1 subject, {CLINICAL_SLICES} "
           f"slices), scored before the first step and every {args.finetune_validate_every} steps "
           "(`aggregation.finetune-validate-every`)" if args.finetune_steps and args.finetune_validate_every else "")
        + ", flips/turns in training and the 8-turn self-ensemble at "
        "inference, whole slices restored as blended 64×64 tiles (MONAI sliding window). Filters tuned per site on "
        "its training pairs. Scored on every "
        f"{'' if args.test_every == 1 else f'{args.test_every}nd '}held-out slice of each site. Training: "
        f"{train_seconds / 60:.1f} min on this machine ({machine}). Command: `{command}`.", "",
        CLINICAL_TABLE, "",
        "| site | method | PSNR (dB) | PSNR-W (dB) | SSIM | MAE (HU) | CPU s/slice |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [clinical_row(r, "site", "method") for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
