"""Does a site's validation subject choose its personal fine-tune as its test slices would?

    python benchmarks/finetune_trajectory.py [--run benchmarks/results/denoise/run] [--steps 900] [--every 150]

Reads the denoise benchmark's finished run (``denoise_baselines.py``): each site's round
model (the last global checkpoint plus the FedBN layers it kept), fine-tuned further on
its own training pairs in parts of ``--every`` steps, as ``aggregation.finetune-steps``
does. After every part it scores the site's validation subject (whole slices, no
self-ensemble: what ``finetune-validate-every`` ranks by) and every 2nd held-out test slice
(with the self-ensemble: what the benchmark reports), and writes both curves and the
step count each would choose to results.json and results.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_common import clinical_scores, clinical_sites
import medgan.compare as compare
from medgan_core.run_layout import RunLayout
from medgan_core.study_config import load_study
from medgan_core.tasks.registry import load_task_data, load_task_validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("benchmarks/results/denoise/run"))
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/denoise-native"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune-trajectory"))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not RunLayout(args.run).study_id_file.exists():
        raise SystemExit(f"{args.run} holds no finished run; run benchmarks/denoise_baselines.py first")
    study = load_study(args.run / "config.toml")
    sites = clinical_sites(args.data, ("ct", "ct-low-dose"))
    models = compare.site_models(study, sites, args.run, personal=False)  # the round's models, not fine-tuned
    curves: dict[str, list[dict[str, float]]] = {}
    for site in sites:
        task, data = models[site.name], load_task_data(site, study.task)
        held_out = load_task_validation(site, study.task)
        assert held_out is not None and data.test_input is not None
        test_in, test = data.test_input[::2], data.test[::2]
        curve = curves[site.name] = []
        for part, steps in enumerate(range(0, args.steps + 1, args.every)):
            if steps:
                task.train(data, args.every, seed=study.run.rounds * 1000 + part)
            validation = task.validation_score(held_out)
            scores = clinical_scores(task.restore(test_in), test)
            curve.append({"steps": steps, "validation-psnr": validation, **{f"test-{k}": v for k, v in scores.items()}})
            print(site.name, json.dumps(curve[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/finetune_trajectory.py --steps {args.steps} --every {args.every}"
    (args.out / "results.json").write_text(json.dumps({"command": command, "curves": curves}, indent=2))
    lines = ["# Personal fine-tune: the validation subject's choice against the test slices'", "",
             f"Each site's round-{study.run.rounds} model of `{args.run}` fine-tuned on, scored every {args.every} "
             "steps: whole-range PSNR (dB) on its validation subject (no self-ensemble) and on every 2nd held-out "
             f"test slice (8-turn self-ensemble, as reported). Command: `{command}`.", "",
             "| site | steps | validation PSNR | test PSNR | test PSNR-W | test SSIM |", "|---|---:|---:|---:|---:|---:|"]
    for name, curve in curves.items():
        lines += [f"| {name} | {c['steps']} | {c['validation-psnr']:.3f} | {c['test-psnr']:.3f} | "
                  f"{c['test-psnr-window']:.3f} | {c['test-ssim']:.4f} |" for c in curve]
    lines += ["", "| site | chosen on validation | test PSNR there | best on test | test PSNR there | last | test PSNR there |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, curve in curves.items():
        chosen = max(curve, key=lambda c: c["validation-psnr"])
        best = max(curve, key=lambda c: c["test-psnr"])
        lines.append(f"| {name} | {chosen['steps']} | {chosen['test-psnr']:.3f} | {best['steps']} | "
                     f"{best['test-psnr']:.3f} | {curve[-1]['steps']} | {curve[-1]['test-psnr']:.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
