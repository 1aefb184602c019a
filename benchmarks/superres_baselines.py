"""CT super-resolution: the federated GAN against bicubic interpolation, ×2 and ×4.

    python benchmarks/superres_baselines.py [--out benchmarks/results/superres] [--rounds 5] [--local-steps 60]

Three simulated hospitals (different doses, kernels, calibrations) each hold CT series
and the same series acquired on a 2× and a 4× coarser grid. The `superres` task trains in
Flower's simulation engine, once per factor (no DP: the comparison is the method), and
every site's held-out split is scored against the original grid (PSNR, SSIM, MAE in HU
inside the window) for bicubic interpolation (what a viewer shows, and the GAN's input)
and the GAN. Writes results.json and results.md. Not a timed test.
"""

from __future__ import annotations

import json

from bench_common import arguments, image_scores, paired_study, study_sites, train_federated
from medgan_core.tasks.registry import load_task_data


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/superres")
    sites = study_sites(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, seconds = [], {}
    for scale in (2, 4):
        study = paired_study(args, sites, name="superres", scale=scale)
        task, seconds[f"×{scale}"] = train_federated(study, sites, args.out / f"run-x{scale}")
        hu = (study.task.window_high - study.task.window_low) / 2
        for site in sites:
            data = load_task_data(site, study.task)
            assert data.test_input is not None
            for method, output in (("bicubic", data.test_input), ("GAN (federated)", task.restore(data.test_input))):
                rows.append({"scale": scale, "site": site.name, "method": method, "test_slices": len(data.test),
                             **image_scores(output, data.test, hu)})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "train_seconds": seconds}, indent=2))
    lines = ["# CT super-resolution: federated GAN vs bicubic interpolation", "",
             f"3 simulated hospitals, {args.rounds} rounds × {args.local_steps} local steps, 64×64 target slices "
             "(inputs on a 32×32 or 16×16 grid), soft-tissue window, no DP. Training time on 2 CPU cores: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
             + f". Command: `python benchmarks/superres_baselines.py --rounds {args.rounds} --local-steps {args.local_steps}`.", "",
             "| scale | site | method | PSNR (dB) | SSIM | MAE (HU) |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| ×{r['scale']} | {r['site']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['mae_hu']:.1f} |"
              for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
