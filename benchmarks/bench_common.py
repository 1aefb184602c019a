"""What the federated-training benchmarks share: the study on disk, arguments, training, scores.

Imported by the scripts beside it (``python benchmarks/NAME.py`` puts this folder on the path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgan_core.config import AggregationConfig
from medgan_core.study_config import StudyConfig, load_study
from medgan_core.data.simulate import MR_MATRIX, mr_matrix_for, simulate_study, stale_simulation, study_mr_matrix
from medgan_core.errors import ConfigError
from medgan_core.data.preprocess import CT_FULL_RANGE
from medgan_core.metrics.image_quality import ct_scores, psnr_ssim
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task
from medgan_core.checkpoints import load_checkpoint
import medgan.compare as compare
from medgan.simulation import simulate_federation


def mr_matrix_value(text: str) -> int:
    """A --mr-matrix value the simulator takes (``mr_matrix_for``'s rule), else argparse's one-line error."""
    try:
        value = int(text)
        mr_matrix_for(value, value)
    except (ValueError, ConfigError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return value


def arguments(doc: str | None, out: str, data: str = "benchmarks/data/sites", rounds: int = 5,
              local_steps: int = 60, reuse_help: str = "", seeds: int = 0,
              finetune_steps: int = -1, mr_matrix: int = 0,
              more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--out, --data, --rounds (5) and --local-steps (60): sized for about 3 minutes a run on 2 cores
    at width 16 (a script that needs more passes its own defaults); --reuse when ``reuse_help`` says
    what it reuses; --seeds (default ``seeds``) when a script repeats a measurement over seeds;
    --finetune-steps (default ``finetune_steps``) and --finetune-validate-every (the study
    default) when ``finetune_steps`` >= 0: each site's personal fine-tune; --mr-matrix (default
    ``mr_matrix``) when it is given: the simulated MR's matrix over the 400 mm field; ``more``
    adds a script's own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--data", type=Path, default=Path(data))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-steps", type=int, default=local_steps)
    if reuse_help:
        parser.add_argument("--reuse", action="store_true", help=reuse_help)
    if seeds:
        parser.add_argument("--seeds", type=int, default=seeds, help="Repeats over seeds (mean ± standard deviation).")
    if finetune_steps >= 0:
        parser.add_argument("--finetune-steps", type=int, default=finetune_steps,
                            help="Each site's personal fine-tune after the last round (aggregation.finetune-steps).")
        parser.add_argument("--finetune-validate-every", type=int,
                            default=AggregationConfig.finetune_validate_every,
                            help="Each site keeps the best of its fine-tune on its validation subjects, scored every "
                                 "this many steps (aggregation.finetune-validate-every; 0: the last).")
    if mr_matrix:
        parser.add_argument("--mr-matrix", type=mr_matrix_value, default=mr_matrix,
                            help=f"MR matrix of the simulated sites over 400 mm (default {mr_matrix}, "
                                 f"{400 / mr_matrix:.2f} mm pixels); a --data folder holds one.")
    if more is not None:
        more(parser)
    return parser.parse_args()


def study_sites(data: Path) -> list[Path]:
    """Three simulated hospitals (12 subjects × 12 slices, 128²), written once and reused
    (again when a study written by an older simulator lacks the label maps)."""
    if (data / "study.json").exists() and (stale := stale_simulation(data)):
        raise SystemExit(stale)  # its NIfTI would now read flipped against its DICOM
    if not (data / "study.json").exists() or not any(data.glob("*/seg")):
        simulate_study(data, n_sites=3, n_subjects=12, n_slices=12, size=128, seed=3)
    return sorted(p for p in data.iterdir() if (p / "manifest.csv").exists())


#: The clinical-geometry study of the image-to-image benchmarks: 3 hospitals, 12 subjects × 8
#: slices, 512×512 over 400 mm (0.78 mm pixels).
CLINICAL_SUBJECTS, CLINICAL_SLICES, CLINICAL_SIZE = 12, 8, 512


def clinical_sites(data: Path, series: tuple[str, ...], mr_matrix: int = MR_MATRIX) -> list[Path]:
    """Three hospitals at clinical geometry holding ``series`` (e.g. ``("ct", "ct-low-dose")``,
    MR on an ``mr_matrix`` grid), written once into ``data`` and reused."""
    if (data / "study.json").exists() and (stale := stale_simulation(data)):
        raise SystemExit(stale)
    if (data / "study.json").exists() and {"mr", "mr-kspace"} & set(series):
        if (found := study_mr_matrix(data)) != mr_matrix:
            raise SystemExit(f"{data} holds MR at {found}×{found}, this benchmark reads it at "
                             f"{mr_matrix}×{mr_matrix}; give another --data folder")
    if not (data / "study.json").exists():
        simulate_study(data, n_sites=3, n_subjects=CLINICAL_SUBJECTS, n_slices=CLINICAL_SLICES,
                       size=CLINICAL_SIZE, seed=3, series=series, mr_matrix=mr_matrix)
    return sorted(p for p in data.iterdir() if (p / "manifest.csv").exists())


def clinical_scores(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Whole-range PSNR, window PSNR and SSIM, MAE in HU inside the body (``ct_scores``), averaged."""
    scores = ct_scores(output, target, CT_FULL_RANGE, CLINICAL_WINDOW)
    return {key: float(np.mean(values)) for key, values in scores.items()}


CLINICAL_WINDOW = (-160.0, 240.0)
CLINICAL_TABLE = ("PSNR: whole CT range (data range 4095 HU); PSNR-W and SSIM: soft-tissue window [-160, 240] "
                  "HU; MAE: HU inside the body, bone included; CPU s: CPU seconds per slice of the output grid.")


def clinical_row(r: dict[str, Any], *first: str) -> str:
    """One markdown row of ``clinical_scores`` with the leading columns ``first``."""
    return ("| " + " | ".join(str(r[k]) for k in first) + f" | {r['psnr']:.2f} | {r['psnr-window']:.2f} | "
            f"{r['ssim']:.3f} | {r['mae-hu']:.1f} | {r['cpu_s_per_slice']:.2f} |")


def timed(fn: Callable[[], torch.Tensor], slices: int) -> tuple[torch.Tensor, float]:
    """fn()'s output and its CPU seconds per slice (process time: every core counts)."""
    started = time.process_time()
    out = fn()
    return out, (time.process_time() - started) / slices


def paired_study(args: argparse.Namespace, sites: list[Path], aggregation: dict[str, Any] | None = None,
                 **task: Any) -> StudyConfig:
    """A no-DP study of an image-to-image task at 64², width 16, batch 16 (held-out evaluation
    in rounds 0, 1 and the last: the benchmark scores the final models itself)."""
    return StudyConfig().replace(
        run={"rounds": args.rounds, "num_sites": len(sites), "device": "cpu", "evaluate_every": args.rounds},
        task={"width": 16, "batch_size": 16, "local_steps": args.local_steps, **task},
        privacy={"enabled": False},
        aggregation=aggregation,
    )


def train_federated(study: StudyConfig, sites: list[Path], run_dir: Path) -> tuple[Task, float]:
    """Run the study in Flower's simulation engine; the final global model and the seconds it took."""
    started = time.monotonic()
    simulate_federation(study, sites, run_dir)
    seconds = time.monotonic() - started
    task = build_task(study.task)
    task.set_weights(load_checkpoint(run_dir / "checkpoints" / f"round-{study.run.rounds:03d}.safetensors")[0])
    return task, seconds


def trained_in(args: argparse.Namespace, study: StudyConfig, sites: list[Path], run_dir: Path) -> tuple[Task, float]:
    """``train_federated`` into ``run_dir``, its seconds kept in ``run_dir/train-seconds``; with
    ``--reuse``, a run there that finished (its final checkpoint and seconds) is loaded instead,
    after ``other_study`` finds it is this study's."""
    final = run_dir / "checkpoints" / f"round-{study.run.rounds:03d}.safetensors"
    timing = run_dir / "train-seconds"
    if getattr(args, "reuse", False) and final.exists() and timing.exists():
        if why := other_study(run_dir, study):
            raise SystemExit(f"--reuse: {run_dir} {why}; run without --reuse to train it again")
        task = build_task(study.task)
        task.set_weights(load_checkpoint(final)[0])
        return task, float(timing.read_text())
    task, seconds = train_federated(study, sites, run_dir)
    record_start(run_dir, study)
    timing.write_text(f"{seconds:.1f}\n")
    return task, seconds


#: Beside a benchmark run that started from ``run.initial-model``: that file's SHA-256.
START_DIGEST = "initial-model.sha256"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_start(run_dir: Path, study: StudyConfig) -> None:
    """After training into ``run_dir``: the start file's digest beside it, or none (a record left
    by an earlier warm run in the same folder would vouch for this cold one)."""
    recorded = run_dir / START_DIGEST
    if study.run.initial_model:
        recorded.write_text(file_digest(Path(study.run.initial_model).expanduser()) + "\n")
    else:
        recorded.unlink(missing_ok=True)


def other_study(run_dir: Path, study: StudyConfig) -> str:
    """Why the finished run in ``run_dir`` is not ``study``'s ("" when it is): its config.toml
    holds other [task], [privacy] or [aggregation] settings or rounds, or it started from another
    file (compared by content: a start model made again under the same name is another start)."""
    saved = run_dir / "config.toml"
    if saved.is_file():
        ran = load_study(saved)
        for table in ("task", "privacy", "aggregation"):
            if getattr(ran, table) != getattr(study, table):
                return f"ran other [{table}] settings than this study"
        if ran.run.rounds != study.run.rounds:
            return f"ran {ran.run.rounds} rounds, not {study.run.rounds}"
    recorded = run_dir / START_DIGEST
    if not study.run.initial_model and recorded.is_file():
        return "grew from a start file; this study starts from scratch"
    if study.run.initial_model:
        start = Path(study.run.initial_model).expanduser()
        if not recorded.is_file():
            return f"has no record of the start file it grew from ({START_DIGEST})"
        if not start.is_file() or recorded.read_text().strip() != file_digest(start):
            return f"started from another {start.name} than the one there now"
    return ""


def trained_or_reused(args: argparse.Namespace, study: StudyConfig, sites: list[Path]) -> tuple[Task, float]:
    """``train_federated`` into OUT/run, or with ``--reuse`` that run's final checkpoint and the
    training time its results.json recorded. ``--reuse`` without that checkpoint (another
    --rounds, or no earlier run) stops with a message rather than quietly training for minutes."""
    run_dir = args.out / "run"
    final = run_dir / "checkpoints" / f"round-{study.run.rounds:03d}.safetensors"
    if getattr(args, "reuse", False):
        results = args.out / "results.json"
        if not final.exists() or not results.exists():
            missing = final if not final.exists() else results
            raise SystemExit(f"--reuse: {missing} does not exist; run once without --reuse "
                             f"(with the same --rounds and --out) to train it")
        if why := other_study(run_dir, study):
            raise SystemExit(f"--reuse: {run_dir} {why}; run without --reuse to train it again")
        task = build_task(study.task)
        task.set_weights(load_checkpoint(final)[0])
        return task, json.loads(results.read_text())["train_seconds"]
    task, seconds = train_federated(study, sites, run_dir)
    record_start(run_dir, study)
    return task, seconds


def image_scores(output: torch.Tensor, target: torch.Tensor, hu_per_unit: float) -> dict[str, float]:
    """PSNR and SSIM (data range 2) and the mean absolute error in HU inside the window."""
    psnr, ssim = psnr_ssim(output, target)
    return {"psnr": psnr, "ssim": ssim, "mae_hu": float((output.clamp(-1, 1) - target).abs().mean()) * hu_per_unit}


def site_models(study: StudyConfig, sites: list[Path], run_dir: Path, trained: Task) -> list[Task]:
    """Each site's own final model: ``trained``'s arrays plus what the site kept at home
    (``medgan study compare`` builds them the same way)."""
    return list(compare.site_models(study, sites, run_dir, trained.get_weights()).values())


def fit_cross_entropy(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int, seed: int,
                      draw: Callable[[torch.Generator], torch.Tensor]) -> nn.Module:
    """Adam (lr 2e-3) on cross-entropy, each batch's indices from ``draw(generator)``: the small
    segmenters and classifiers the benchmarks score images with. Returns ``net`` in eval mode."""
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = draw(generator)
        loss = F.cross_entropy(net(images[idx]), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()
