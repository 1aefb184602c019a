"""Every task, one site round with DP and one without, on a chosen device: does it run there?

    python benchmarks/device_check.py [--device auto] [--precision fp32] [--out benchmarks/results/device]

For a hospital that installs MedGAN-FL on a GPU server: before a study, check that every
task trains on the device (DP-SGD through Opacus included), that its weights change, stay
finite and come back to the CPU, that evaluation and the preview run, and how long a
local round takes. It simulates one small site (4 subjects × 6 slices at 128²) and uses the
site-round code a ClientApp runs (`medgan_core.site_round`), without Flower, so it also
runs on a machine without the federation stack. ``--precision bf16`` checks the rounds with
bfloat16 forward passes (``task.precision``). Writes results.json and results.md; exits
non-zero when a check fails. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medgan_core.config import PrivacyConfig, SiteConfig, TaskConfig
from medgan_core.data.simulate import simulate_study
from medgan_core.runtime import resolve_device
from medgan_core.site_round import train_site_round
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, task_config, task_names

STEPS = 4


def small_config(name: str, precision: str = "fp32") -> TaskConfig:
    modality = "MR" if name == "recon" else "CT"
    own = {"eval_samples": 32} if name in ("synthesis", "conditional") else {}
    return task_config(name=name, modality=modality, batch_size=8, local_steps=STEPS, width=16, precision=precision,
                       **own)


def check_task(name: str, site: Path, device: torch.device, state_dir: Path,
               precision: str = "fp32") -> dict[str, object]:
    """One DP round and one plain round of ``name`` on ``device``; the checks and timings."""
    config = small_config(name, precision)
    data = load_task_data(site, config)
    row: dict[str, object] = {"task": name}
    for private in (True, False):
        task = build_task(config, device)
        before = task.get_weights()
        privacy = PrivacyConfig(enabled=private, target_epsilon=8.0)
        site_config = SiteConfig(data_path=str(site), state_dir=str(state_dir / f"{name}-{private}"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = train_site_round(task, data, site_config, privacy, planned_rounds=2, study_id="device-check", seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        after = task.get_weights()
        label = "dp" if private else "plain"
        on_device = {p.device.type for module in task.groups.values() for p in module.parameters()}
        row[f"{label}-params-on"] = ",".join(sorted(on_device))
        row[f"{label}-changed"] = float(np.mean([not np.array_equal(before[k], after[k]) for k in before]))
        row[f"{label}-finite"] = all(np.isfinite(v).all() for v in after.values())
        row[f"{label}-round-seconds"] = seconds
        if private:
            row["epsilon"] = metrics["epsilon"]
    evaluation = task.evaluate(data)
    row["metrics-finite"] = all(np.isfinite(v) for v in evaluation.values())
    row["metrics"] = {k: round(float(v), 4) for k, v in evaluation.items()}
    grid = task.preview(2)
    row["preview-shape"] = list(grid.shape)
    return row


def failures(row: dict[str, object], device: torch.device) -> list[str]:
    out = []
    for label in ("dp", "plain"):
        if row[f"{label}-params-on"] != device.type:
            out.append(f"{label}: parameters on {row[f'{label}-params-on']}, not {device.type}")
        if not row[f"{label}-finite"]:
            out.append(f"{label}: non-finite weights")
        if float(row[f"{label}-changed"]) < 0.5:  # type: ignore[arg-type]
            out.append(f"{label}: only {row[f'{label}-changed']:.0%} of the arrays changed")
    if not 0 < float(row["epsilon"]) <= 8.0:  # type: ignore[arg-type]
        out.append(f"epsilon {row['epsilon']} outside (0, 8]")
    if not row["metrics-finite"]:
        out.append("non-finite evaluation metric")
    return out


def report(rows: list[dict], problems: dict[str, list[str]], device_name: str, device_arg: str, torch_version: str,
           precision: str = "fp32") -> str:
    command = f"python benchmarks/device_check.py --device {device_arg}" + \
        (f" --precision {precision}" if precision != "fp32" else "")
    lines = [f"# Device check: every task on {device_name}", "",
             f"One simulated site, batch 8, width 16, {STEPS} local steps per round, task.precision {precision}, "
             f"torch {torch_version}. Command: `{command}`.", "",
             "Round times are wall-clock for one site round of 4 steps; the DP round includes calibrating the noise "
             "to the budget and the accountant, and the first task's round includes the device's warm-up.", "",
             "| task | DP round (s) | plain round (s) | ε after 1 of 2 rounds | arrays changed (DP / plain) | checks |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['task']} | {r['dp-round-seconds']:.2f} | {r['plain-round-seconds']:.2f} | {r['epsilon']:.2f} | "
              f"{r['dp-changed']:.0%} / {r['plain-changed']:.0%} | {'; '.join(problems[r['task']]) or 'ok'} |"  # type: ignore[index]
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="task.precision of every round (bf16: forward passes under bfloat16 autocast)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/device"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, problems = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        site = simulate_study(Path(tmp) / "sites", n_sites=1, n_subjects=4, n_slices=6, size=128, seed=5)[0]
        print(f"simulated one site in {time.perf_counter() - started:.0f} s", flush=True)
        for name in task_names():
            row = check_task(name, site, device, Path(tmp) / "state", args.precision)
            rows.append(row)
            problems[name] = failures(row, device)
            print(json.dumps(row), "FAILED: " + "; ".join(problems[name]) if problems[name] else "ok", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    (args.out / "results.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                       "precision": args.precision, "rows": rows,
                                                       "problems": problems}, indent=2))
    (args.out / "results.md").write_text(report(rows, problems, name, args.device, torch.__version__, args.precision))
    print(f"results in {args.out}")
    sys.exit(1 if any(problems.values()) else 0)


if __name__ == "__main__":
    main()
