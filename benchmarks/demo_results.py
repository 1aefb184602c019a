"""The demo's results file: what a `medgan demo` run measured, and a picture of its grid.

    python benchmarks/demo_results.py runs/demo [--out benchmarks/results/demo] [--rows 1]
        [--command "git clone … && make demo"] [--timing "install 85 s, …"]

Reads the run folder (``metrics.jsonl``, ``config.toml``, the last round's sample grid) and
writes ``results.md``: the held-out scores after every evaluated round, by site after the
last (each site's fine-tuned model where the study fine-tunes), and the ε each site spent;
and ``last-round.png``: the first ``--rows`` rows of the last round's grid at full
resolution (for the demo: whole 512×512 slices, quarter dose | the federated model | full
dose). Not a timed test.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image

from medgan.compare import machine
from medgan_core.study_config import StudyConfig, load_study
from medgan_core.tasks.registry import task_class
from server.run_folder import RunFolder
from server.samples import GRID_PAD as PAD
from server.samples import UPSCALE_BELOW


def first_rows(grid: Image.Image, columns: int, keep: int) -> Image.Image:
    """The top ``keep`` rows of a sample grid of square images in ``columns`` columns, found
    from its size: images under UPSCALE_BELOW pixels were drawn twice as large, border included."""
    width, height = grid.size
    for upscale in (1, 2):
        side = (width / upscale - PAD) / columns - PAD
        rows = (height / upscale - PAD) / (side + PAD)
        if side.is_integer() and rows.is_integer() and (upscale == 2) == (side < UPSCALE_BELOW):
            return grid.crop((0, 0, width, upscale * (min(keep, int(rows)) * (int(side) + PAD) + PAD)))
    raise ValueError(f"a {width}×{height} image is not a grid of square images in {columns} columns")


def markdown(study: StudyConfig, evaluated: list[dict[str, Any]], command: str, timing: str) -> str:
    """``evaluated``: the run's metrics lines that carry held-out scores, in order."""
    last = evaluated[-1]
    keys = [key for key in ("psnr", "psnr-window", "ssim", "mae-hu", "swd", "fid", "diversity") if key in last["evaluate"]]
    head = keys + [f"{key}-input" for key in keys if f"{key}-input" in last["evaluate"]]
    privacy = f"on at ε = {study.privacy.target_epsilon:g}" if study.privacy.enabled else "off"
    out = [f"# `medgan demo`: {study.task.name}, {study.run.num_sites} sites, {study.run.rounds} rounds", "",
           f"Command: `{command}`. Machine: {machine()}." + (f" Time: {timing}." if timing else ""),
           f"Settings: the run folder's `config.toml` (task `{study.task.name}`, width {study.task.width}, "
           f"{study.task.local_steps} local steps a round, DP {privacy}, start "
           f"{study.run.initial_model or 'seeded initialisation'}). The DP noise comes from OS entropy: a "
           "rerun differs. Held-out scores as each site sent them, averaged by the coordinator; `-input`: the same "
           "score of the task's input (for `denoise`, the quarter-dose image).", "",
           "| round | " + " | ".join(head) + " | largest ε spent |", "|---:|" + "---:|" * (len(head) + 1)]
    for line in evaluated:
        spent = [site["train"]["epsilon"] for site in line.get("sites", []) if "epsilon" in site.get("train", {})]
        cells = " | ".join(f"{line['evaluate'][key]:.3f}" for key in head)
        out.append(f"| {line['round']} | {cells} | {f'{max(spent):.2f}' if spent else '—'} |")
    finetuned = bool(study.aggregation.finetune_steps) and last["round"] == study.run.rounds
    mark = (f" (each site's own model: the federated one fine-tuned {study.aggregation.finetune_steps} steps on "
            "its own scans)" if finetuned else "")
    out += ["", f"By site after round {last['round']}{mark}:", "", "| site | " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(head)]
    for site in sorted(last.get("sites", []), key=lambda s: str(s.get("site", ""))):
        if site.get("evaluate"):
            out.append(f"| {site.get('site', site.get('node'))} | "
                       + " | ".join(f"{site['evaluate'][key]:.3f}" for key in head) + " |")
    out += ["", "`last-round.png`: the first rows of the last round's sample grid "
            f"(`samples/round-{last['round']:03d}.png`), made by the coordinator from its own phantom"
            + (" with the federated model (the sites' fine-tuned models never leave them)." if finetuned else ".")]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo"))
    parser.add_argument("--rows", type=int, default=1, help="grid rows in last-round.png")
    parser.add_argument("--command", default="git clone … && make demo")
    parser.add_argument("--timing", default="", help="the wall times measured, in words")
    args = parser.parse_args()
    folder = RunFolder(args.run_dir)
    evaluated = [line for line in folder.read_metrics() if line.get("evaluate")]
    if not evaluated or not folder.config.is_file():
        parser.error(f"{args.run_dir} is not a run folder with an evaluated round and its config.toml: give one 'medgan demo' wrote")
    study = load_study(folder.config)
    grid = Image.open(folder.samples(evaluated[-1]["round"]))
    picture = first_rows(grid, task_class(study.task.name).preview_columns, args.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    picture.save(args.out / "last-round.png")
    (args.out / "results.md").write_text(markdown(study, evaluated, args.command, args.timing))
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
