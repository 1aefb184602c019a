"""What bfloat16 forward passes (``task.precision = "bf16"``) buy a site's training round.

For every task: images per second of one ``Task.train`` call (a round's local steps, as
``speed.py`` measures it), without and with DP-SGD, in float32 and with the forward passes
under bfloat16 autocast. Each speed-up is the median of back-to-back pairs (float32 round,
then bfloat16 round), with the pairs' range: this machine's speed wanders within minutes.
Under DP the materialised per-sample gradients are bfloat16 too, while every record's norm,
clip factor, clipped sum and the noise stay float32 (tests), and a weight clipped from its
factors (``ghost``) takes them to float32.

    python benchmarks/mixed_precision.py [--steps 10] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from medgan_core.runtime import resolve_device
from medgan_core.tasks.registry import task_names
from speed import BATCH, BENCH_DP, WIDTHS, _data, _round_rate, bench_task, machine, paired_ratio


def precision_rates(name: str, size: int, steps: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Best images/s of float32 and bfloat16 rounds, plain and DP, and each speed-up as the
    median of ``repeats`` back-to-back pairs."""
    tasks = {precision: bench_task(name, size, WIDTHS.get(name, 16), device, precision)
             for precision in ("fp32", "bf16")}
    data = _data(name, size, torch.Generator().manual_seed(0))
    per_step = len(tasks["fp32"].batch_pools(data))  # cycle: a batch of each scanner per step
    row: dict[str, float] = {}
    for mode, private in (("plain", None), ("dp", BENCH_DP)):
        pairs = [tuple(_round_rate(lambda n, t=tasks[p]: t.train(data, n, seed=0, dp=private), steps, per_step,
                                   device)  # a GPU's queued work inside the timing
                       for p in ("fp32", "bf16")) for _ in range(repeats)]
        row[f"{mode}-fp32"] = max(full for full, _ in pairs)
        row[f"{mode}-bf16"] = max(half for _, half in pairs)
        row.update(paired_ratio(f"{mode}-speedup", [half / full for full, half in pairs]))
    return row


def cpu_bfloat16() -> str:
    """The CPU's bfloat16 instructions as /proc/cpuinfo lists them (without them autocast emulates bfloat16)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return ", ".join(sorted(f for f in flags if "bf16" in f)) or "none"


def write_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# bfloat16 forward passes (`task.precision = \"bf16\"`) against float32", "",
        f"Command: `{results['command']}`. Machine: {results['machine']}; the CPU's bfloat16 instructions: "
        f"{results['cpu-bf16']}. Device: {results['device']}. Batch {BATCH} "
        f"(DP: Poisson, expected {BATCH}), {results['size']}×{results['size']}; synthesis and conditional width 32, "
        f"the others 16. Images per second over one round of {results['steps']} local steps, the best of "
        f"{results['repeats']}; each speed-up (bf16 / fp32) the median of {results['repeats']} back-to-back pairs, "
        "with the pairs' range.", "",
        "| task | plain fp32 img/s | plain bf16 img/s | speed-up (range) | DP fp32 img/s | DP bf16 img/s | "
        "speed-up (range) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["tasks"].items():
        lines.append(f"| {name} | {row['plain-fp32']:.1f} | {row['plain-bf16']:.1f} | {row['plain-speedup']:.2f}× "
                     f"({row['plain-speedup-low']:.2f}–{row['plain-speedup-high']:.2f}) | {row['dp-fp32']:.1f} | "
                     f"{row['dp-bf16']:.1f} | {row['dp-speedup']:.2f}× "
                     f"({row['dp-speedup-low']:.2f}–{row['dp-speedup-high']:.2f}) |")
    lines += ["", "Under DP the networks' forward and backward passes and the materialised per-sample gradients run "
              "in bfloat16; every record's norm, clip factor and clipped sum are taken in float32 from the same "
              "per-sample values, and a weight clipped from its factors takes them to float32 first "
              "(`medgan_core/privacy/per_sample.py`, `full_precision_factors`), so a record's clip factor comes from "
              "the norm of exactly what is added up, and ε is the same mechanism's (`tests/test_mixed_precision.py`)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back pairs per speed-up (median reported)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    parser.add_argument("--tasks", nargs="*", default=None, help="a subset of the tasks (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/mixed-precision[-cuda]")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus on a first layer: harmless
    names = args.tasks or task_names()
    tasks = {}
    for name in names:
        tasks[name] = precision_rates(name, args.size, args.steps, args.repeats, device)
        print(name, {k: round(v, 2) for k, v in tasks[name].items()}, flush=True)
    command = (f"python benchmarks/mixed_precision.py --steps {args.steps} --size {args.size} --repeats {args.repeats}"
               f" --device {args.device}" + (f" --tasks {' '.join(args.tasks)}" if args.tasks else ""))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = args.out or Path("benchmarks/results") / ("mixed-precision" + ("-cuda" if device.type == "cuda" else ""))
    write_results(out, {"command": command, "machine": machine(), "cpu-bf16": cpu_bfloat16(), "device": gpu,
                        "size": args.size,
                        "steps": args.steps, "repeats": args.repeats, "tasks": tasks})


if __name__ == "__main__":
    main()
