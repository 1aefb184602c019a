"""What keeps the DP demo's generator from collapsing onto one slice: the levers, measured.

    python benchmarks/synthesis_dp_levers.py [--out benchmarks/results/synthesis-dp] [--reuse]

Each arm is the synthesis demo (`sites_example/demo-synthesis.toml`: three simulated hospitals at
clinical geometry, synthesis at 64×64, width 8, 8 rounds × 100 local steps, DP-SGD at
ε = 8, δ = 1e-5, from the shipped public model `sites_example/demo-synthesis-public-model.medgan`
with only norms and biases trained; "from scratch" arms drop that start and train every
weight) with a few `[task]` or `[privacy]` keys changed, or the same sites and ε
from a public warm start (`sites_example/synthesis-warm-dp.toml`, width 32; the model
comes from `sites_example/synthesis-pretrain.toml`'s commands: the no-DP demo's settings,
mode-seeking included, on other simulated subjects), run with `medgan demo`
into OUT/run-ARM. Scores are the demo's own held-out metrics after the last round (SWD,
FID on the phantom feature network, diversity as a share of the real slices' spread,
precision, recall: mean over the sites, from the run's metrics.jsonl), and the diversity
of every round. The DP noise comes from OS entropy, so a rerun differs. Writes
results.json, results.md and each arm's last sample grid (samples-ARM.png).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import arguments
from speed import machine as describe_machine
from medgan_core.study_config import dump_study, load_study

DEMO = Path("sites_example/demo-synthesis.toml")
#: The demo's sites at ε = 8 from a model trained on public simulated data (width 32).
WARM = Path("sites_example/synthesis-warm-dp.toml")
#: The demo's settings from scratch: no public model, every weight trained.
SCRATCH_RUN, SCRATCH_TASK = {"initial_model": ""}, {"trainable": "all"}
#: Arm slug -> (what it is, the study file it changes, [task] changes, [privacy] changes, [run] changes).
ARMS: dict[str, tuple[str, Path, dict, dict, dict]] = {
    "demo": ("the demo as it is (public start, width 8, DP trains norms and biases)", DEMO, {}, {}, {}),
    "scratch": ("the demo's settings from scratch (every weight, one D step per G step)", DEMO, SCRATCH_TASK, {},
                SCRATCH_RUN),
    "d-steps-2": ("from scratch, d-steps 2, lr-generator 2e-4", DEMO,
                  {**SCRATCH_TASK, "d_steps": 2, "lr_generator": 2e-4}, {}, SCRATCH_RUN),
    "d-steps-5": ("from scratch, d-steps 5, lr-generator 5e-4", DEMO,
                  {**SCRATCH_TASK, "d_steps": 5, "lr_generator": 5e-4}, {}, SCRATCH_RUN),
    "mode-seeking-0.1": ("from scratch, mode-seeking 0.1", DEMO, {**SCRATCH_TASK, "mode_seeking": 0.1}, {}, SCRATCH_RUN),
    "mode-seeking-0.2": ("from scratch, mode-seeking 0.2", DEMO, {**SCRATCH_TASK, "mode_seeking": 0.2}, {}, SCRATCH_RUN),
    "mode-seeking-1": ("from scratch, mode-seeking 1.0", DEMO, {**SCRATCH_TASK, "mode_seeking": 1.0}, {}, SCRATCH_RUN),
    "no-dp": ("the demo's settings from scratch without DP", DEMO, SCRATCH_TASK, {"enabled": False}, SCRATCH_RUN),
    "warm-norms": ("public warm start (width 32), DP trains norms and biases", WARM, {}, {}, {}),
    "warm-norms-ms": ("public warm start (width 32), DP trains norms and biases, mode-seeking 0.2", WARM,
                      {"mode_seeking": 0.2}, {}, {}),
    "warm-all": ("public warm start (width 32), DP trains every weight", WARM, {"trainable": "all"}, {}, {}),
}
PRETRAIN = ("medgan sites simulate --out benchmarks/data/synthesis-public --subjects 24 --slices 20 --size 512 "
            "--seed 103 --task synthesis; medgan demo --config sites_example/synthesis-pretrain.toml; "
            "medgan export runs/synthesis-pretrain --out runs/synthesis-public.medgan")
METRICS = ("swd", "fid", "diversity", "precision", "recall")


def run_arm(out: Path, slug: str, base: Path, task: dict, privacy: dict, run: dict, rounds: int,
            reuse: bool) -> tuple[list[dict], float]:
    """The arm's metrics.jsonl rounds (trained now, or with ``reuse`` read from a finished run)
    and its training seconds (0 when reused)."""
    run_dir = out / f"run-{slug}"
    metrics = run_dir / "metrics.jsonl"
    study = load_study(base).replace(run={**run, "out_dir": str(run_dir), "rounds": rounds}, task=task, privacy=privacy)

    def finished() -> list[dict]:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        return rows if rows and rows[-1]["round"] == rounds else []

    if reuse and (rows := finished()):
        ran = load_study(run_dir / "config.toml")
        if (ran.task, ran.privacy, bool(ran.run.initial_model)) != (study.task, study.privacy,
                                                                   bool(study.run.initial_model)):
            raise SystemExit(f"--reuse: {run_dir} ran other [task] or [privacy] settings, or another start, "
                             f"than arm {slug}")
        return rows, 0.0
    if study.run.initial_model and not Path(study.run.initial_model).exists():
        raise SystemExit(f"arm {slug} starts from {study.run.initial_model}; make it first: {PRETRAIN}")
    arms = out / "arms"  # each arm's study file and console log (not results: gitignored)
    arms.mkdir(exist_ok=True)
    config = arms / f"{slug}.toml"
    config.write_text(dump_study(study))
    started = time.monotonic()
    with open(arms / f"{slug}.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "medgan.cli", "demo", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not (rows := finished()):
        raise SystemExit(f"arm {slug} failed (exit {code}); see {arms / f'{slug}.log'}")
    return rows, time.monotonic() - started


def main() -> None:
    args = arguments(__doc__, "benchmarks/results/synthesis-dp", rounds=8, local_steps=100,
                     reuse_help="Score a finished run in OUT/run-ARM instead of training it again.")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for slug, (label, base, task, privacy, run) in ARMS.items():
        rows, seconds = run_arm(args.out, slug, base, {**task, "local_steps": args.local_steps}, privacy, run,
                                args.rounds, getattr(args, "reuse", False))
        last = rows[-1]
        grid = args.out / f"run-{slug}" / last["samples"]
        if grid.exists():
            shutil.copyfile(grid, args.out / f"samples-{slug}.png")
        results[slug] = {"label": label, "seconds": seconds, **{k: last["evaluate"][k] for k in METRICS},
                         "diversity_by_round": [r["evaluate"].get("diversity") for r in rows]}
        print(json.dumps({slug: results[slug]}), flush=True)
    machine = describe_machine()
    (args.out / "results.json").write_text(json.dumps({"arms": results, "machine": machine}, indent=2))
    lines = ["# The DP demo's generator: levers against mode collapse", "",
             f"Command: `python benchmarks/synthesis_dp_levers.py --rounds {args.rounds} --local-steps "
             f"{args.local_steps}`. Machine: {machine}. Each arm is `{DEMO}` (synthesis 64×64, width 8, "
             "DP-SGD at ε = 8 unless the arm says otherwise, from the public model `sites_example/demo-synthesis-public-model"
             ".medgan`, width 8, trained by `sites_example/demo-synthesis-pretrain.toml`, norms and biases trained; arms "
             "'from scratch' drop that start and train every weight) with the keys named, or for a warm start "
             f"`{WARM}` "
             "(the same sites and ε, width 32, from a model trained without DP on other simulated subjects: "
             f"`{PRETRAIN}`; a warm arm's round 0 is that model on the study's held-out slices); held-out scores after "
             "the last round, mean over the three sites. SWD and FID: lower is better; diversity is the generated slices' "
             "mean pairwise feature distance as a share of the real slices' (the issue's target: ≥ 0.8), precision "
             "and recall higher. The DP noise comes from OS entropy: a rerun differs.", "",
             "| arm | SWD | FID | diversity | precision | recall | diversity by round (0 → last) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for slug, r in results.items():
        trail = " ".join(f"{d:.2f}" for d in r["diversity_by_round"])
        lines.append(f"| {r['label']} | {r['swd']:.3f} | {r['fid']:.2f} | {r['diversity']:.2f} | "
                     f"{r['precision']:.2f} | {r['recall']:.2f} | {trail} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
