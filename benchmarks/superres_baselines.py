"""CT super-resolution at clinical resolution: the federated GAN against bicubic and Lanczos
interpolation, ×2 and ×4, on whole 512×512 slices of 0.78 mm pixels.

    python benchmarks/superres_baselines.py [--out benchmarks/results/superres] [--rounds 5] [--local-steps 60]

Three simulated hospitals (different doses, kernels, calibrations) each hold CT series at
512×512 over 400 mm and the same series acquired on a 2× and a 4× coarser grid (1.56 mm,
3.1 mm). The `superres` task trains in Flower's simulation engine, once per factor (no DP:
the comparison is the method), on 64×64 patches of the original grid over the whole CT
range. Every site's held-out slices are scored against the original grid (whole-range
PSNR, window PSNR and SSIM, MAE in HU inside the body) for bicubic interpolation (what a
viewer shows, and the GAN's input), Lanczos interpolation (PIL) of the acquired coarse
grid, and the GAN applied to whole slices tile by tile. Writes results.json and
results.md. Not a timed test.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from bench_common import (
    CLINICAL_SIZE,
    CLINICAL_TABLE,
    arguments,
    clinical_row,
    clinical_scores,
    clinical_sites,
    paired_study,
    site_models,
    timed,
    train_federated,
)
from medgan_core.data import read_manifest
from medgan_core.data.dataset import clinical_slices
from medgan_core.data.preprocess import CT_FULL_RANGE
from medgan_core.tasks.registry import load_task_data

# Each site's personal fine-tune, the best on its validation subject: against the shared model
# alone Lanczos keeps the window PSNR at hospital B at ×2 (39.95 vs 39.66 dB, --finetune-steps 0).
FINETUNE_STEPS = 300


def coarse_test_slices(site: object, scale: int) -> torch.Tensor:
    """The acquired coarse-grid series of the held-out subjects, in the order the task's data
    holds their targets (pair_id order), on the whole-range scale."""
    manifest = read_manifest(site)  # type: ignore[arg-type]
    split = "test" if manifest.select(modality="CT", split="test") else "val"
    entries = sorted(manifest.select(modality="CT", split=split, variant=f"low-res-x{scale}"),
                     key=lambda e: e.pair_id or e.subject)
    return torch.cat([clinical_slices(manifest.load(e), 0.0, CT_FULL_RANGE) for e in entries])


def lanczos(coarse: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """PIL's Lanczos (a = 3) resampling of each slice onto ``shape``."""
    out = [np.asarray(Image.fromarray(img[0].numpy().astype(np.float32), mode="F")
                      .resize((shape[1], shape[0]), Image.Resampling.LANCZOS)) for img in coarse]
    return torch.from_numpy(np.stack(out))[:, None].clamp(-1, 1)


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/superres", data="benchmarks/data/superres-native",
                     finetune_steps=FINETUNE_STEPS)
    torch.set_num_threads(2)
    sites = clinical_sites(args.data, ("ct", "ct-low-res"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, seconds = [], {}
    gan_label = "GAN (federated)" + (
        "" if not args.finetune_steps else f" + {args.finetune_steps}-step personal fine-tune" + (
            ", best on validation" if args.finetune_validate_every else ""))
    for scale in (2, 4):
        study = paired_study(args, sites, name="superres", scale=scale, spacing=0.0).replace(aggregation={
            "finetune_steps": args.finetune_steps, "finetune_validate_every": args.finetune_validate_every})
        task, seconds[f"×{scale}"] = train_federated(study, sites, args.out / f"run-x{scale}")
        models = site_models(study, sites, args.out / f"run-x{scale}", task)  # personal where fine-tuned
        for site, model in zip(sites, models):
            data = load_task_data(site, study.task)
            assert data.test_input is not None
            coarse = coarse_test_slices(site, scale)
            assert len(coarse) == len(data.test)
            outputs = {
                "bicubic": (data.test_input, 0.0),
                "Lanczos": timed(lambda: lanczos(coarse, tuple(data.test.shape[-2:])), len(coarse)),
                gan_label: timed(lambda: model.restore_series(data.test_input, data.test_series), len(coarse)),
            }
            for method, (output, cpu) in outputs.items():
                rows.append({"scale": f"×{scale}", "site": site.name, "method": method, "test_slices": len(data.test),
                             "cpu_s_per_slice": cpu, **clinical_scores(output, data.test)})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "train_seconds": seconds}, indent=2))
    lines = ["# CT super-resolution at clinical resolution: federated GAN vs bicubic and Lanczos", "",
             f"3 simulated hospitals, targets {CLINICAL_SIZE}×{CLINICAL_SIZE} over 400 mm (0.78 mm), inputs acquired "
             f"on a 2× or 4× coarser grid; {args.rounds} rounds × {args.local_steps} local steps on 64×64 patches over "
             "the whole CT range, whole slices restored as blended tiles, no DP. Training time on 2 CPU cores: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
             + (f". Then each site fine-tunes its own copy for up to {args.finetune_steps} steps, keeping the best "
                f"on its validation subject, scored every {args.finetune_validate_every} steps (`aggregation."
                "finetune-steps`, `finetune-validate-every`)" if args.finetune_steps and args.finetune_validate_every
                else f". Then each site fine-tunes its own copy for {args.finetune_steps} steps"
                if args.finetune_steps else "")
             + f". Command: `python benchmarks/superres_baselines.py --rounds {args.rounds} "
             f"--local-steps {args.local_steps} --finetune-steps {args.finetune_steps} "
             f"--finetune-validate-every {args.finetune_validate_every}`.", "", CLINICAL_TABLE, "",
             "| scale | site | method | PSNR (dB) | PSNR-W (dB) | SSIM | MAE (HU) | CPU s/slice |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [clinical_row(r, "scale", "site", "method") for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
