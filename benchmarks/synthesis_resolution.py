"""Synthesis at 128×128: the plain DCGAN against its multi-scale skip form, with and without
MSGAN's mode-seeking term.

    python benchmarks/synthesis_resolution.py [--out benchmarks/results/synthesis-128] [--rounds 5] [--local-steps 100]

Three simulated hospitals (the benchmarks' 128×128 study, 12 subjects × 12 slices each)
train `synthesis` in Flower's simulation engine (no DP, width 16, batch 16, FedAvg) on
whole slices at 128×128 over the 400 mm field (3.125 mm pixels, CT in the soft-tissue
window), once with `architecture = "dcgan"` and once with `"skips"` (the generator draws
an image at every resolution and sums them; the discriminator reads the image pooled to
each of its resolutions: ``medgan_core.models.dcgan``), and the skip form again with
`mode-seeking = 0.2` (MSGAN, Mao et al. 2019: the setting the 64×64 public warm start
uses). Each final global model is scored
on every site's held-out slices by the task's own metrics (patch SWD, FID and KID on the
phantom feature network, diversity, precision and recall). Writes results.json,
results.md and a 4×4 grid of each model's slices.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from bench_common import arguments, study_sites, train_federated
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import load_task_data
from server.samples import save_grid

#: Each arm: the name of its run folder and sample grid, and its [task] settings.
ARMS = {
    "DCGAN": ("dcgan", {"architecture": "dcgan"}),
    "DCGAN with multi-scale skips": ("skips", {"architecture": "skips"}),
    "multi-scale skips + mode-seeking 0.2": ("skips-ms", {"architecture": "skips", "mode_seeking": 0.2}),
}
SIZE = 128
METRICS = ("swd", "fid", "kid", "diversity", "precision", "recall")


def study(args, sites: list, settings: dict) -> StudyConfig:
    return StudyConfig().replace(
        run={"rounds": args.rounds, "num_sites": len(sites), "device": "cpu", "evaluate_every": args.rounds},
        task={"name": "synthesis", "image_size": SIZE, "width": 16, "batch_size": 16,
              "local_steps": args.local_steps, **settings},
        privacy={"enabled": False},
    )


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/synthesis-128", local_steps=100)
    torch.set_num_threads(2)
    sites = study_sites(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, seconds = [], {}
    for arm, (slug, settings) in ARMS.items():
        config = study(args, sites, settings)
        task, seconds[arm] = train_federated(config, sites, args.out / f"run-{slug}")
        save_grid(task.preview(16), args.out / f"samples-{slug}.png", columns=4)
        for site in sites:
            scores = task.evaluate(load_task_data(site, config.task))
            rows.append({"arm": arm, "site": site.name, **{k: scores[k] for k in METRICS}})
            print(json.dumps(rows[-1]), flush=True)
    means = {arm: {k: float(np.mean([r[k] for r in rows if r["arm"] == arm])) for k in METRICS} for arm in ARMS}
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "means": means, "train_seconds": seconds},
                                                      indent=2))
    lines = ["# Synthesis at 128×128: DCGAN, its multi-scale skip form, and the skips with mode-seeking", "",
             f"3 simulated hospitals, whole slices at {SIZE}×{SIZE} over 400 mm (3.125 mm pixels, soft-tissue window), "
             f"{args.rounds} rounds × {args.local_steps} local steps, width 16, batch 16, FedAvg, no DP. Command: "
             f"`python benchmarks/synthesis_resolution.py --rounds {args.rounds} --local-steps {args.local_steps}`. "
             "Machine: 2 CPU cores. Scores on every site's held-out slices (128 generated slices each): SWD, FID and "
             "KID lower is better; diversity (a share of the real slices' spread), precision and recall higher.", "",
             "| model | site | SWD | FID | KID | diversity | precision | recall |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['arm']} | {r['site']} | {r['swd']:.3f} | {r['fid']:.2f} | {r['kid']:.3f} | {r['diversity']:.2f} | "
              f"{r['precision']:.2f} | {r['recall']:.2f} |" for r in rows]
    lines += ["", "| model | training (min) | mean SWD | mean FID | mean diversity | mean precision | mean recall |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {arm} | {seconds[arm] / 60:.1f} | {m['swd']:.3f} | {m['fid']:.2f} | {m['diversity']:.2f} | "
              f"{m['precision']:.2f} | {m['recall']:.2f} |" for arm, m in means.items()]
    lines += ["", "Samples: " + ", ".join(f"`samples-{slug}.png` ({arm})" for arm, (slug, _) in ARMS.items()) + "."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
