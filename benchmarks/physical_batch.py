"""What ``task.physical-batch`` buys: a site's training memory follows the part, not the batch.

One site trains ``translate`` (width 16, 64×64 patches) at a batch of 128 records, with and
without DP, whole and in parts of 64, 32 and 16 records. Each setting runs in a fresh process;
its peak resident memory is reset (``/proc/self/clear_refs``) after the data and the task are
built, so the figure is what a round of training adds. Seconds per step (of a second round)
come with it: smaller parts cost some speed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import warnings
from pathlib import Path

import torch

from medgan_core.privacy.dp_sgd import DPSettings
from medgan_core.tasks.registry import build_task, task_config
from speed import RECORDS, _data, machine

BATCH = 128


def _memory_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(physical: int, private: bool, steps: int, queue: multiprocessing.Queue) -> None:
    """One setting in this (fresh) process: the peak memory the steps add, and seconds a step."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    config = task_config(name="translate", image_size=64, width=16, batch_size=BATCH, physical_batch=physical)
    data = _data("translate", 64, torch.Generator().manual_seed(0))
    task = build_task(config)
    dp = DPSettings(1.0, 1.0, BATCH / RECORDS, BATCH, secure_rng=False) if private else None
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from now
    before = _memory_mib("VmRSS")
    task.train(data, steps=steps, seed=0, dp=dp)
    added = _memory_mib("VmHWM") - before
    started = time.perf_counter()  # timed apart: the first round also wraps and allocates
    task.train(data, steps=steps, seed=1, dp=dp)
    seconds = (time.perf_counter() - started) / steps
    queue.put({"physical-batch": physical, "dp": private, "added-peak-mib": added,
               "seconds-per-step": seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/physical-batch"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for private in (True, False):
        for physical in (0, 64, 32, 16):
            queue = context.Queue()
            process = context.Process(target=measure, args=(physical, private, args.steps, queue))
            process.start()
            row = queue.get(timeout=1800)
            process.join(timeout=60)
            rows.append(row)
            print(row, flush=True)
    results = {"command": f"python benchmarks/physical_batch.py --steps {args.steps}", "machine": machine(),
               "batch": BATCH, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Memory of a training step: whole batch against physical parts (`task.physical-batch`)", "",
             f"Command: `{results['command']}` (from the repository root, `benchmarks` on the path). Machine: "
             f"{results['machine']}. `translate`, width 16, 64×64 patches, batch {BATCH} (DP: Poisson, expected "
             f"{BATCH}); each row in a fresh process: the peak resident memory a round of {args.steps} steps "
             f"adds over the memory before it (data and networks built), and the seconds a step of a second "
             "round.", "",
             "| DP | physical-batch | peak memory added (MiB) | seconds a step |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {'yes' if row['dp'] else 'no'} | {row['physical-batch'] or 'whole batch'} | "
                     f"{row['added-peak-mib']:.0f} | {row['seconds-per-step']:.2f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
