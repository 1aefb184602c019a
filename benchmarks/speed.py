"""What a site's training step costs in the framework, against the bare loops it wraps.

For every task: images per second of one ``Task.train`` call (a round's local steps, set-up
included once) on one site, without and with DP-SGD (the framework's one private path:
Opacus wrapping, Poisson batches from a secret sampler), after a warm-up call. For the two generator families, the same
networks and batch in a bare PyTorch GAN loop and a bare Opacus loop (``GradSampleModule``
+ ``DPOptimizer``, fixed batches): the framework's overhead over the loops it wraps.
Also the bytes a site sends per round (its shared arrays) and the process's peak memory.

This machine's speed wanders by up to 2× within minutes, so every ratio (DP cost, framework
over bare loop) is measured in pairs taken back to back, and the table gives the median of
the pairs' ratios with their range; a slow spell then slows both sides of a pair.

    python benchmarks/speed.py [--steps 20] [--repeats 5] [--device auto] [--precision fp32]
                              [--out benchmarks/results/speed]

On a GPU (``--device auto`` finds one) it writes ``benchmarks/results/speed-cuda`` (with
``--precision bf16``: ``speed-cuda-bf16``); the bare loops run in float32 only, so with
``--precision bf16`` the table gives the framework's rounds and their DP cost alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from medgan_core.data.dataset import SiteData
from medgan_core.privacy.dp_sgd import DPSettings
from medgan_core.runtime import cpu_model, resolve_device
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task, task_config, task_names

BATCH, RECORDS = 32, 320  # sample rate 0.1: Poisson batches of 32 on average


def _data(name: str, size: int, generator: torch.Generator) -> SiteData:
    """Random tensors shaped like the task's site data (the step's cost does not depend on content)."""
    def images(channels: int = 1) -> torch.Tensor:
        return torch.rand(RECORDS, channels, size, size, generator=generator) * 2 - 1

    if name == "recon":
        return SiteData("bench", images(), images(), images(3), images(3))
    if name == "conditional":
        burden = torch.rand(RECORDS, generator=generator) * 0.3
        return SiteData("bench", images(), images(), train_condition=burden, test_condition=burden)
    if name == "synthesis":
        return SiteData("bench", images(), images())
    return SiteData("bench", images(), images(), images(), images())


def synchronise(device: torch.device | None) -> None:
    """Wait for a GPU's queued work, so that a clock reading covers it (nothing on a CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], None], steps: int, warmup: int = 3, device: torch.device | None = None) -> float:
    for _ in range(warmup):
        step()
    synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronise(device)
    return steps * BATCH / (time.perf_counter() - started)


def _round_rate(train: Callable[[int], object], steps: int, batches_per_step: int,
                device: torch.device | None = None) -> float:
    """Images/s of one ``train`` call of ``steps`` steps (a round: wrapping and set-up included
    once, as at a site), after a 2-step warm-up call."""
    train(2)
    synchronise(device)
    started = time.perf_counter()
    train(steps)
    synchronise(device)
    return steps * BATCH * batches_per_step / (time.perf_counter() - started)


#: The benchmark's networks: the DCGAN family at width 32, the U-Nets at 16.
WIDTHS = {"synthesis": 32, "conditional": 32}
#: DP-SGD as a site runs it (Poisson batches of ``BATCH`` on average, secret noise).
BENCH_DP = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=BATCH / RECORDS,
                      expected_batch_size=BATCH, secure_rng=True)


def bench_task(name: str, size: int, width: int, device: torch.device = torch.device("cpu"),
               precision: str = "fp32") -> Task:
    """``name`` as the benchmarks build it: batch ``BATCH``, ``size``² images (recon on MR)."""
    modality = "MR" if name == "recon" else "CT"
    own = {"z_dim": 64} if name in ("synthesis", "conditional") else {}
    return build_task(task_config(name=name, modality=modality, image_size=size, width=width, batch_size=BATCH,
                                  precision=precision, **own), device)


def framework_rates(name: str, size: int, width: int, steps: int, repeats: int = 1,
                    device: torch.device = torch.device("cpu"), precision: str = "fp32") -> dict[str, float]:
    """Plain and DP images/s of a round, each the best of ``repeats`` rounds (the least
    disturbed), and the DP cost as the median of ``repeats`` back-to-back pairs (a slow spell
    hits both rounds of a pair)."""
    task = bench_task(name, size, width, device, precision)
    data = _data(name, size, torch.Generator().manual_seed(0))
    per_step = len(task.batch_pools(data))  # cycle: a batch of each scanner per step
    pairs = [(_round_rate(lambda n: task.train(data, n, seed=0), steps, per_step, device),
              _round_rate(lambda n: task.train(data, n, seed=0, dp=BENCH_DP), steps, per_step, device))
             for _ in range(repeats)]
    sent = sum(a.nbytes for a in task.get_weights().values())
    return {"plain": max(p for p, _ in pairs), "dp": max(q for _, q in pairs),
            **paired_ratio("dp-cost", [p / q for p, q in pairs]), "bytes-sent": float(sent)}


def paired_ratio(key: str, ratios: list[float]) -> dict[str, float]:
    """The median of ratios measured in back-to-back pairs, and their range."""
    return {key: statistics.median(ratios), f"{key}-low": min(ratios), f"{key}-high": max(ratios)}


def bare_loops(name: str, size: int, width: int, steps: int, repeats: int,
               device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """The bare loop of ``name``'s family (``synthesis``: DCGAN, non-saturating loss;
    ``denoise``: pix2pix, adversarial + 100 × L1; Adam 0.5/0.999) on copies of the framework's
    own networks: best plain and DP images/s, its DP cost, and the framework's overhead (bare
    plain images/s over the framework's plain round), each ratio from back-to-back pairs."""
    task = bench_task(name, size, width, device)
    data = _data(name, size, torch.Generator().manual_seed(0))
    latent = (lambda n: torch.randn(n, 64, device=device)) if name == "synthesis" else None
    paired = name != "synthesis"
    plain_step, _ = bare_step(copy.deepcopy(task.generator), copy.deepcopy(task.discriminator), latent, size, paired,
                              private=False, device=device)
    private_step, close = bare_step(copy.deepcopy(task.generator), copy.deepcopy(task.discriminator), latent, size,
                                    paired, private=True, device=device)
    runs = [(_rate(plain_step, steps, device=device), _rate(private_step, steps, device=device),
             _round_rate(lambda n: task.train(data, n, seed=0), steps, 1, device)) for _ in range(repeats)]
    close()
    return {"plain": max(r[0] for r in runs), "dp": max(r[1] for r in runs),
            **paired_ratio("dp-cost", [p / q for p, q, _ in runs]),
            **paired_ratio("overhead", [p / f for p, _, f in runs])}


def bare_step(generator: torch.nn.Module, discriminator: torch.nn.Module, latent: Callable | None, size: int,
              paired: bool, private: bool, device: torch.device = torch.device("cpu")
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """One step of the bare loop on these networks, and what removes Opacus' hooks after.
    Under DP the discriminator (and a paired generator, which reads the images) is Opacus'
    ``GradSampleModule``; the DCGAN discriminator steps on its real and generated halves as
    two backward passes, as Opacus' DCGAN example does."""
    real = torch.rand(BATCH, 1, size, size, device=device) * 2 - 1
    low = real + 0.1 * torch.randn_like(real)
    g, d = generator, discriminator
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    if private:
        d = GradSampleModule(d)
        opt_d = DPOptimizer(opt_d, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH)
        if paired:
            g = GradSampleModule(g)
            opt_g = DPOptimizer(opt_g, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH)

    def step() -> None:
        if paired:
            with torch.no_grad():
                fake = g(low)
            loss_d = (F.softplus(-d(low, real)) + F.softplus(d(low, fake))).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            fake = g(low)
            loss_g = F.softplus(-d(low, fake)).mean() + 100 * (fake - real).abs().mean()
        else:
            fake = g(latent(BATCH))
            opt_d.zero_grad()
            F.softplus(-d(real)).mean().backward()
            F.softplus(d(fake.detach())).mean().backward()
            opt_d.step()
            loss_g = F.softplus(-d(fake)).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if private:
            opt_d.zero_grad()

    def close() -> None:
        for module in (d, g):
            if isinstance(module, GradSampleModule):
                module._close()

    return step, close


def machine() -> dict[str, object]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "processor": cpu_model()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5,
                        help="pairs of measurements per ratio (the median is reported), rates the best of them")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="task.precision of the framework's rounds (the bare loops run in float32 only)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/speed, speed-cuda on a GPU, with -bf16 for --precision bf16")
    args = parser.parse_args()
    device = resolve_device(args.device)
    out = args.out or Path("benchmarks/results") / ("speed" + ("-cuda" if device.type == "cuda" else "")
                                                    + ("-bf16" if args.precision == "bf16" else ""))
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus on a first layer: harmless
    tasks = {}
    for name in task_names():
        tasks[name] = framework_rates(name, args.size, WIDTHS.get(name, 16), args.steps, args.repeats, device,
                                      args.precision)
        print(name, {k: round(v, 2) for k, v in tasks[name].items()}, flush=True)
    bare = {}
    if args.precision == "fp32":
        bare = {"synthesis": bare_loops("synthesis", args.size, 32, args.steps, args.repeats, device),
                "denoise": bare_loops("denoise", args.size, 16, args.steps, args.repeats, device)}
        print("bare", bare, flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    command = f"python benchmarks/speed.py --steps {args.steps} --size {args.size} --repeats {args.repeats}" + \
        ("" if args.device == "auto" else f" --device {args.device}") + \
        ("" if args.precision == "fp32" else f" --precision {args.precision}")
    results = {"command": command, "machine": machine(), "device": gpu or "CPU", "precision": args.precision,
               "batch": BATCH, "size": args.size, "tasks": tasks, "bare": bare, "peak-rss-mib": peak_mib}
    if gpu:
        results["peak-gpu-mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    where = f" Device: {gpu}, task.precision {args.precision}; peak GPU memory allocated " \
        f"{results['peak-gpu-mib']:.0f} MiB." if gpu else ("" if args.precision == "fp32" else
                                                              f" task.precision {args.precision}.")
    lines = [
        "# A site's training step: framework against bare loops", "",
        f"Command: `{results['command']}`. Machine: {results['machine']}.{where} Batch {BATCH} (DP: Poisson, expected "
        f"{BATCH}), {args.size}×{args.size}; synthesis and conditional width 32, the others 16. Images per second over "
        f"one round of {args.steps} local steps (bare loops: {args.steps} steps after 3 warm-up steps), the best of "
        f"{args.repeats}. Each ratio is the median of {args.repeats} back-to-back pairs (plain round, then DP round; "
        "bare loop, then framework round), with the pairs' range: this machine's speed wanders by up to 2× within "
        f"minutes. Peak resident memory of the whole benchmark process {peak_mib:.0f} MiB.", "",
        "| task | plain img/s | DP img/s | DP cost (plain / DP), median | pairs' range | bytes sent per round |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in tasks.items():
        lines.append(f"| {name} | {row['plain']:.1f} | {row['dp']:.1f} | {row['dp-cost']:.2f}× | "
                     f"{row['dp-cost-low']:.2f}–{row['dp-cost-high']:.2f} | {row['bytes-sent'] / 1e6:.2f} MB |")
    if bare:
        lines += ["", "Bare loops on copies of the same networks and batch (Opacus `GradSampleModule` + `DPOptimizer`, "
                  "fixed batches, no accounting); overhead: the bare loop's plain images/s over the framework's plain "
                  "round, measured in pairs (1.05: the framework 5 % slower):", "",
                  "| loop | plain img/s | DP img/s | DP cost, median (range) | framework overhead, median (range) |",
                  "|---|---:|---:|---:|---:|"]
    else:
        lines += ["", f"No bare loops: they run in float32 only, and these rounds ran with task.precision "
                  f"{args.precision} (`python benchmarks/mixed_precision.py` compares the two precisions)."]
    for name, row in bare.items():
        lines.append(f"| {name} | {row['plain']:.1f} | {row['dp']:.1f} | {row['dp-cost']:.2f}× "
                     f"({row['dp-cost-low']:.2f}–{row['dp-cost-high']:.2f}) | {row['overhead']:.2f} "
                     f"({row['overhead-low']:.2f}–{row['overhead-high']:.2f}) |")
    lines += ["", "The bare DCGAN loop under DP runs the discriminator's real and generated halves as two backward "
              "passes, as Opacus' DCGAN example does; the framework runs both in one pass (each image still its own "
              "clipped per-sample gradient). Its private backward computes no ordinary weight gradients; wide "
              "convolutions' per-sample gradients come from PyTorch's weight-gradient kernel one record at a time "
              "(`medgan_core/privacy/per_sample.py`); deep convolutions' weights are clipped from their inputs and "
              "output gradients without per-sample gradients (`medgan_core/privacy/ghost.py`). Every form gives "
              "Opacus' clipped sum (tests)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
