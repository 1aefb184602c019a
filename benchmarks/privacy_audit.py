"""Privacy audit: membership inference with and without DP, and utility vs ε.

    python benchmarks/privacy_audit.py [--out benchmarks/results/privacy] [--steps 800] [--seeded]
    python benchmarks/privacy_audit.py --unit patient   # ε per patient -> benchmarks/results/privacy-patient
    python benchmarks/privacy_audit.py --tasks denoise-demo   # the default demo itself, its rows only

1. Membership inference: a site trains alone (what the coordinator receives from it each
   round is exactly this model), then the attacker scores every slice of the site with
   the released discriminator (for denoising: the (low-dose, full-dose) pair) and guesses
   "member" for high scores. AUC 0.5 = the attack learns nothing; 1.0 = it tells
   training patients from others perfectly.
2. Utility vs privacy: the same training at ε ∈ {1, 3, 8, ∞}: synthesis by held-out SWD
   (lower is better), denoising by held-out PSNR/SSIM against full dose.

The DP noise and Poisson sampling draw from OS entropy, as in a real deployment, so two
runs give different AUCs (each AUC's standard error, Hanley–McNeil, is in the table).
``--seeded`` makes them follow the seed instead (``secure-rng = false``): a rerun on the
same machine and torch build then reproduces the table, at the cost of noise an attacker
who knew the seed could predict — an audit setting, never a deployment one.

Writes results.json, results.md and utility_privacy.png into --out. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medgan.cli import DEMO_SIZE, DEMO_SLICES, DEMO_SUBJECTS  # how `medgan demo` simulates its sites
from medgan_core.config import PrivacyConfig, TaskConfig
from medgan_core.data.dataset import SiteData
from medgan_core.data.simulate import DEFAULT_SITES, series_for, simulate_site, simulate_study
from medgan_core.model_file import load_model
from medgan_core.privacy import SiteAccountant, plan_dp
from medgan_core.study_config import load_study
from medgan_core.tasks.registry import build_task, task_class
from medgan_core.tasks.registry import load_task_data, replace_task, task_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = load_study(ROOT / "sites_example" / "demo.toml")
EPSILONS = (1.0, 3.0, 8.0, float("inf"))
SYNTHESIS = task_config(name="synthesis", width=8, batch_size=32, lr_generator=1e-4, eval_samples=128)
TASKS = {
    "synthesis": SYNTHESIS,
    # The synthesis demo's way: the shipped public model (other simulated subjects, no DP), its norms and biases trained.
    "synthesis-public-start": replace_task(SYNTHESIS, trainable="norms"),
    # DP-SGD wants a larger step than plain training; the same settings serve every ε.
    "denoise": task_config(name="denoise", width=8, batch_size=16, lr_generator=2e-3, lr_discriminator=2e-3),
    # The default demo's way: its task (width 16, both networks under DP at a quarter of the no-DP rate), from
    # its shipped public denoiser; every held-out slice scored.
    "denoise-public-start": replace_task(DEMO.task, eval_slices=0),
    # The default demo itself: the same task on one of its own sites (the scans' 512² slices at 0.78 mm), for
    # the steps one of its sites takes: its rounds and its personal fine-tune, all under the one ε.
    "denoise-demo": replace_task(DEMO.task, eval_slices=0),
}
#: Tasks that start from a model file instead of their initialisation (public data: outside ε).
STARTS = {"synthesis-public-start": Path("sites_example/demo-synthesis-public-model.medgan"),
          "denoise-public-start": Path("sites_example/demo-public-model.medgan"),
          "denoise-demo": ROOT / DEMO.run.initial_model}
#: Tasks audited on a site of their own, for their own number of steps (the others: --data, --steps).
DEMO_STEPS = DEMO.run.rounds * DEMO.task.local_steps + DEMO.aggregation.finetune_steps
OWN_STEPS = {"denoise-demo": DEMO_STEPS}


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann–Whitney U)."""
    greater = (members[:, None] > others[None, :]).mean()
    ties = (members[:, None] == others[None, :]).mean()
    return float(greater + 0.5 * ties)


def auc_standard_error(area: float, members: int, others: int) -> float:
    """Hanley & McNeil (1982): the AUC's standard error from its value and the two set sizes,
    so a reader can tell a change between runs from sampling noise."""
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    variance = area * (1 - area) + (members - 1) * (q1 - area**2) + (others - 1) * (q2 - area**2)
    return float(np.sqrt(max(variance, 0.0) / (members * others)))


@torch.no_grad()
def discriminator_scores(task, images: torch.Tensor, inputs: torch.Tensor | None, chunk: int = 16) -> np.ndarray:
    """The released discriminator's score of every slice (a few at a time: 512² slices are large)."""
    task.discriminator.eval()
    scores = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        scores.append(task.discriminator(part) if inputs is None else
                      task.discriminator(inputs[start:start + chunk], part))
    return torch.cat(scores).numpy()


def start_attack(config: TaskConfig, data: SiteData, start: Path) -> float:
    """The attack's AUC against the public start itself, before the site trains: the part of an
    AUC that is how these held-out subjects differ from the training ones, not membership."""
    task = build_task(config)
    task.set_weights(load_model(start).arrays, source=str(start))
    return auc(discriminator_scores(task, data.train, data.train_input),
               discriminator_scores(task, data.test, data.test_input))


def demo_site(root: Path) -> Path:
    """The default demo's first site, simulated as ``medgan demo`` simulates it (its seed, size and series)."""
    site = root / f"site-01-{DEFAULT_SITES[0].name}"
    if not (site / "manifest.csv").exists():
        print(f"simulating the demo's first site in {root} …", flush=True)
        series = series_for(task_class(DEMO.task.name).data_spec(DEMO.task), DEMO.task.modality)
        [site] = simulate_study(root, n_sites=1, n_subjects=DEMO_SUBJECTS, n_slices=DEMO_SLICES, size=DEMO_SIZE,
                                seed=DEMO.task.seed, series=series)
    return site


def train(config: TaskConfig, data: SiteData, steps: int, epsilon: float, seed: int = 0, seeded: bool = False,
          unit: str = "slice", start: Path | None = None):
    task = build_task(config)
    if start is not None:
        task.set_weights(load_model(start).arrays, source=str(start))
    dp = accountant = None
    if np.isfinite(epsilon):
        privacy = PrivacyConfig(target_epsilon=epsilon, secure_rng=not seeded, unit=unit)
        # one joint release of the task's private networks per step (σ/√k each), over slices or patients
        dp = plan_dp(privacy, task.dp_records(data, unit), config.batch_size, steps, task.dp_releases_per_step)
        accountant = SiteAccountant()
    chunk = 100
    for start in range(0, steps, chunk):
        task.train(data, min(chunk, steps - start), seed=seed + start, dp=dp, accountant=accountant)
    return task, (accountant.epsilon() if accountant else float("inf")), (dp.noise_multiplier if dp else 0.0)


STRESS = task_config(name="synthesis", width=16, batch_size=16, eval_samples=64)
STRESS_MEMBERS, STRESS_STEPS = 64, 1500


def memorisation_stress(data: SiteData, epsilons: tuple[float, ...] = (8.0, float("inf")),
                        seeded: bool = False) -> list[dict]:
    """The attacker's best case: a wider discriminator trained long on few images (64 slices).

    Without DP it memorises its members; with DP-SGD the same training must not.
    """
    members = SiteData(data.site, data.train[:STRESS_MEMBERS], data.test)
    rows = []
    for epsilon in epsilons:
        task, spent, sigma = train(STRESS, members, STRESS_STEPS, epsilon, seed=1, seeded=seeded)
        scores_in = discriminator_scores(task, members.train, None)
        scores_out = discriminator_scores(task, members.test, None)
        rows.append({"epsilon_target": epsilon, "epsilon_spent": spent, "noise_multiplier": sigma,
                     "members": STRESS_MEMBERS, "held_out_images": len(members.test), "steps": STRESS_STEPS,
                     "mia_auc": auc(scores_in, scores_out), "seeded": seeded})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/privacy, or privacy-patient with --unit patient")
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/audit-site"))
    parser.add_argument("--demo-data", type=Path, default=Path("benchmarks/data/audit-demo"),
                        help="where the demo's first site is simulated for denoise-demo (kept for reruns)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--replot", action="store_true", help="Rewrite results.md and the PNG from results.json.")
    parser.add_argument("--stress-only", action="store_true", help="Only rerun the memorisation stress test.")
    parser.add_argument("--seeded", action="store_true",
                        help="DP noise and sampling follow the seed (secure-rng off), so a rerun reproduces the table.")
    parser.add_argument("--unit", choices=("slice", "patient"), default="slice",
                        help="the DP record (privacy.unit); the memorisation stress test runs for slices only")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=tuple(TASKS),
                        help="audit only these; the other tasks' rows and the stress test stay as OUT holds them")
    args = parser.parse_args()
    args.out = args.out or Path("benchmarks/results/privacy" + ("-patient" if args.unit == "patient" else ""))
    if args.stress_only:
        stress = memorisation_stress(load_task_data(args.data, TASKS["synthesis"]), seeded=args.seeded)
        (args.out / "stress.json").write_text(json.dumps(stress, indent=2))
        args.replot = True
    if args.replot:
        rows = json.loads((args.out / "results.json").read_text())
        write_markdown(rows, args.out / "results.md", args)
        plot(rows, args.out / "utility_privacy.png")
        return
    torch.set_num_threads(2)
    if not (args.data / "manifest.csv").exists():
        print(f"simulating the audit site in {args.data} …", flush=True)
        # Many subjects with few slices each: membership is judged against 12 held-out
        # subjects, so one unusual patient cannot masquerade as a membership signal.
        simulate_site(DEFAULT_SITES[2], args.data, n_subjects=60, n_slices=4, size=128, seed=11)
    args.out.mkdir(parents=True, exist_ok=True)
    everything = tuple(args.tasks) == tuple(TASKS)
    if not everything and not (args.out / "results.json").exists():
        raise SystemExit(f"--tasks keeps the other tasks' rows from {args.out / 'results.json'}, which does not "
                         "exist: run the whole audit first")
    kept = [] if everything else [r for r in json.loads((args.out / "results.json").read_text())
                                  if r["task"] not in args.tasks]
    rows = []
    for name in args.tasks:
        config = TASKS[name]
        data = load_task_data(demo_site(args.demo_data) if name == "denoise-demo" else args.data, config)
        steps = OWN_STEPS.get(name, args.steps)
        start_auc = start_attack(config, data, STARTS[name]) if name in STARTS else None
        for epsilon in EPSILONS:
            started = time.monotonic()
            task, spent, sigma = train(config, data, steps, epsilon, seeded=args.seeded, unit=args.unit,
                                       start=STARTS.get(name))
            quality = task.evaluate(data)
            member = discriminator_scores(task, data.train, data.train_input)
            other = discriminator_scores(task, data.test, data.test_input)
            row = {
                "task": name, "epsilon_target": epsilon, "epsilon_spent": spent, "noise_multiplier": sigma,
                "steps": steps, "site": data.site, "train_images": data.num_train, "held_out_images": len(data.test),
                "mia_auc": auc(member, other), "start_mia_auc": start_auc, "seeded": args.seeded, "unit": args.unit,
                "train_patients": len(set(data.train_subjects.tolist())),
                **{k: v for k, v in quality.items()}, "seconds": time.monotonic() - started,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows = sorted(kept + rows, key=lambda r: list(TASKS).index(r["task"]))  # table order: TASKS'
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    if args.unit == "slice" and everything:
        stress = memorisation_stress(load_task_data(args.data, TASKS["synthesis"]), seeded=args.seeded)
        (args.out / "stress.json").write_text(json.dumps(stress, indent=2))
    write_markdown(rows, args.out / "results.md", args)
    plot(rows, args.out / "utility_privacy.png")
    print(f"results in {args.out}")


def start_cell(row: dict) -> str:
    """The public start's AUC ('—' without a start, or for rows measured before it was)."""
    return "—" if row.get("start_mia_auc") is None else f"{row['start_mia_auc']:.3f}"


def auc_cell(row: dict, members: int) -> str:
    """'0.558 ± 0.047': the AUC and its standard error."""
    return f"{row['mia_auc']:.3f} ± {auc_standard_error(row['mia_auc'], members, row['held_out_images']):.3f}"


def write_markdown(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    seeded, unit = rows[0]["seeded"], rows[0].get("unit", "slice")
    audit_site = [r for r in rows if r["task"] not in OWN_STEPS] or rows
    lines = [
        "# Privacy audit" + (": ε per patient" if unit == "patient" else ""), "",
        f"One simulated site (hospital-c profile, 42 training subjects, {audit_site[0]['train_images']} training "
        f"slices), {audit_site[0]['steps']} local DP-SGD steps, δ = 1e-5, C = 1. Command: `python "
        f"benchmarks/privacy_audit.py --steps {audit_site[0]['steps']}{' --seeded' if seeded else ''}"
        f"{' --unit patient' if unit == 'patient' else ''}` (`--tasks NAME` reruns one task's rows).",
        ("The DP record is a **patient** (`[privacy] unit = \"patient\"`): a batch samples patients at rate "
         "batch / 42 and takes one slice of each, so ε is a patient's." if unit == "patient" else
         "The DP record is a **slice** (`[privacy] unit = \"slice\"`, the default): a batch samples slices at "
         "rate batch / slices, so ε is a slice's; a patient's 4 slices are covered as a group of 4 "
         "(`benchmarks/results/privacy-patient`: the same audit with ε per patient)."),
        "Every ε uses the same settings (denoise: Adam lr 2e-3, which DP-SGD needs; plain training does better "
        "with 2e-4, so the ∞ row understates the non-private optimum). `synthesis-public-start` is the synthesis "
        "demo's way: it starts from `sites_example/demo-synthesis-public-model.medgan` (trained without DP on other simulated "
        "subjects, none of this site's) and trains only norms and biases; the attack scores its released "
        "discriminator like the others'. `denoise-public-start` is the default demo's way: its task "
        "(`sites_example/demo.toml`: width 16, both networks under DP at Adam 1e-4, L1 weight 1000) from "
        "`sites_example/demo-public-model.medgan` (trained without DP on other simulated subjects at 0.78 mm), "
        "every weight trained, on this 128×128 site (3.1 mm pixels), not the demo's geometry. `denoise-demo` is "
        "the default demo itself: the same task and start on the demo's first site (simulated as `medgan demo` "
        f"does: {DEMO_SUBJECTS} subjects of {DEMO_SLICES} slices at {DEMO_SIZE}², 0.78 mm; its own training and "
        f"held-out subjects), for the {DEMO_STEPS} steps one of its sites takes ({DEMO.run.rounds} rounds × "
        f"{DEMO.task.local_steps} and the {DEMO.aggregation.finetune_steps}-step personal fine-tune, planned "
        "under the one ε as the site plans them), every held-out slice scored whole.",
        "",
        ("DP noise and sampling followed the seed (`--seeded`): a rerun on the same machine and torch build "
         "reproduces these numbers." if seeded else
         "DP noise and sampling came from OS entropy, as in deployment: a rerun gives other AUCs. Each AUC "
         "carries its standard error (Hanley–McNeil); `--seeded` makes a rerun reproduce the table."),
        "",
        "The attack's advantage is |2·AUC − 1|: an attacker who learns which direction separates members also "
        f"exploits an AUC below 0.5. The audit site's held-out split is 12 subjects "
        f"({audit_site[0]['held_out_images']} slices), so an AUC also reflects how those subjects differ from the training ones, not only membership: read "
        "differences under about 0.1 as noise.",
        "A task that starts from a public model has the attack's AUC against that start too, before the site "
        "trained (`start's AUC`): what the attack reads from the held-out subjects alone; training's share of an "
        "AUC is its distance from there.",
        "", "| task | steps | members / held-out slices | ε target | ε spent | σ | MIA AUC ± s.e. | attack advantage "
        "| start's AUC | utility |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        utility = (f"SWD {r['swd']:.3f}, diversity {r['diversity']:.2f}" if r["task"].startswith("synthesis")
                   else f"PSNR {r['psnr']:.2f} dB (input {r['psnr-input']:.2f}), SSIM {r['ssim']:.3f}")
        eps = "∞" if not np.isfinite(r["epsilon_target"]) else f"{r['epsilon_target']:g}"
        spent = "∞ (no DP)" if not np.isfinite(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}"
        advantage = abs(2 * r["mia_auc"] - 1)
        lines.append(f"| {r['task']} | {r['steps']} | {r['train_images']} / {r['held_out_images']} | {eps} | {spent} | {r['noise_multiplier']:.2f} | {auc_cell(r, r['train_images'])} | "
                     f"{advantage:.3f} | {start_cell(r)} | {utility} |")
    stress = json.loads((path.parent / "stress.json").read_text()) if (path.parent / "stress.json").exists() else []
    if stress:
        lines += ["", "## Memorisation stress test", "",
                  f"The attacker's best case: synthesis with a wider discriminator (width {STRESS.width}) trained "
                  f"{STRESS_STEPS} steps on only {STRESS_MEMBERS} slices; members are those slices, non-members the "
                  "held-out ones.", "", "| ε target | ε spent | σ | MIA AUC ± s.e. | attack advantage |", "|---:|---:|---:|---:|---:|"]
        for r in stress:
            eps = "∞" if not np.isfinite(r["epsilon_target"]) else f"{r['epsilon_target']:g}"
            spent = "∞ (no DP)" if not np.isfinite(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}"
            lines.append(f"| {eps} | {spent} | {r['noise_multiplier']:.2f} | {auc_cell(r, r['members'])} | "
                         f"{abs(2 * r['mia_auc'] - 1):.3f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = ["1", "3", "8", "∞"]
    for ax, (task, key, title) in zip(axes, [("synthesis", "swd", "synthesis: held-out SWD (↓)"),
                                             ("denoise", "psnr", "denoise: held-out PSNR gain over input, dB (↑)"),
                                             (None, "mia_auc", "membership inference AUC")]):
        if task is None:
            for name in (n for n in TASKS if any(r["task"] == n for r in rows)):
                ax.plot(labels, [r[key] for r in rows if r["task"] == name], marker="o", label=name)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.legend()
        else:
            for name in (n for n in TASKS if n.startswith(task) and any(r["task"] == n for r in rows)):
                # denoise: the gain over each site's own input (the audit site and the demo's differ)
                ax.plot(labels, [r[key] - r.get(f"{key}-input", 0.0) if key == "psnr" else r[key]
                                 for r in rows if r["task"] == name], marker="o", label=name)
            if key == "psnr":
                ax.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="low-dose input")
            ax.legend()
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
