"""GAN-aware aggregation on a non-IID study: which policy gives each hospital the best model?

    python benchmarks/aggregation_benchmark.py [--out benchmarks/results/aggregation] [--rounds 5] [--local-steps 60]

Three simulated hospitals whose CT differs in dose, reconstruction kernel and calibration
(the `denoise` task: quarter-dose → full-dose) train with:
plain FedAvg, a discriminator kept at each site, FedBN (normalisation layers local),
FedProx, FedAdam, local-only training (every group local: no federation), and pooled
training (all sites' images on one machine: the upper bound a federation tries to reach,
with as many optimiser steps as the three sites together). Every model is scored on every
site's held-out split (PSNR/SSIM against full dose, MAE in HU): for local policies each
site's own model (global arrays + the arrays it kept). No DP here, so the comparison is
about aggregation alone. Writes results.json and results.md. Not a timed test.
"""

from __future__ import annotations

import json
import time


from bench_common import arguments, clinical_scores, clinical_sites, paired_study, site_models, train_federated
from medgan.compare import pooled_model
from medgan_core.tasks.registry import load_task_data

METHODS: dict[str, dict[str, object]] = {
    "FedAvg": {},
    "discriminator local": {"group_policies": "discriminator=local"},
    "FedBN (norm layers local)": {"local_norm": True},
    "FedProx (μ = 10)": {"proximal_mu": 10.0},
    "FedAdam (η = 0.003)": {"server_optimizer": "fedadam", "server_lr": 0.003},
    "local only": {"policy": "local"},
}


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/aggregation", data="benchmarks/data/denoise-native")
    sites = clinical_sites(args.data, ("ct", "ct-low-dose"))  # the study of denoise_baselines.py
    args.out.mkdir(parents=True, exist_ok=True)
    base = paired_study(args, sites, name="denoise")
    data = [load_task_data(site, base.task) for site in sites]
    rows, seconds = [], {}

    def score(method: str, models: list[object]) -> None:
        for site, site_data, model in zip(sites, data, models):
            assert site_data.test_input is not None
            rows.append({"method": method, "site": site.name,
                         **clinical_scores(model.restore_series(site_data.test_input, site_data.test_series), site_data.test)})  # type: ignore[attr-defined]
            print(json.dumps(rows[-1]), flush=True)

    score("quarter-dose input", [type("Identity", (), {"restore": staticmethod(lambda x: x)})] * len(sites))
    for method, aggregation in METHODS.items():
        study = base.replace(aggregation=aggregation)
        run_dir = args.out / ("run-" + "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-"))
        trained, seconds[method] = train_federated(study, sites, run_dir)
        models = site_models(study, sites, run_dir, trained)  # each site's own model
        score(method, models)
        print(f"{method}: {seconds[method]:.0f} s", flush=True)
    started = time.monotonic()
    model = pooled_model(base, data)  # as many steps as all sites took, on their union
    seconds["pooled (central)"] = time.monotonic() - started
    score("pooled (central)", [model] * len(sites))

    (args.out / "results.json").write_text(json.dumps({"rows": rows, "train_seconds": seconds}, indent=2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "# Aggregation policies on a non-IID denoising study",
        "",
        f"3 simulated hospitals (different dose, kernel and HU calibration), task `denoise`, {args.rounds} rounds × "
        f"{args.local_steps} local steps, 64×64 patches of 512×512 slices (0.78 mm) over the whole CT range, batch 16, "
        "U-Net width 16, no DP. Held-out whole-range PSNR (dB) per site, SSIM in the soft-tissue window, MAE in HU "
        "inside the body; for local policies each site is scored with its own model. Command: "
        f"`python benchmarks/aggregation_benchmark.py --rounds {args.rounds} --local-steps {args.local_steps}`.",
        "",
        "| method | " + " | ".join(s.name for s in sites) + " | mean PSNR | mean SSIM | mean MAE (HU) | train time |",
        "|---|" + "---:|" * (len(sites) + 4),
    ]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("psnr", "ssim", "mae-hu")}
        time_cell = f"{seconds[method] / 60:.1f} min" if method in seconds else "–"
        lines.append(f"| {method} | " + " | ".join(f"{r['psnr']:.2f}" for r in mine)
                     + f" | {mean['psnr']:.2f} | {mean['ssim']:.3f} | {mean['mae-hu']:.1f} | {time_cell} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
