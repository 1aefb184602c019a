"""report.md: a run's story in one page — settings, per-round metrics, sample grids, files."""

from __future__ import annotations

from typing import Any

from medgan_core.config import StudyConfig
from medgan_core.fileio import atomic_write_text
from server.run_folder import RunFolder

COLUMNS = (("loss-d", "train"), ("loss-g", "train"), ("swd", "evaluate"), ("intensity-w1", "evaluate"))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def write_report(folder: RunFolder, study: StudyConfig) -> str:
    records = folder.read_metrics()
    run, task = study.run, study.task
    lines = [
        f"# MedGAN-FL run: {task.name}",
        "",
        f"- Task: `{task.name}` on {task.modality} slices, {task.image_size}×{task.image_size}",
        f"- Sites: {run.num_sites}; rounds: {run.rounds}; local steps per round: {task.local_steps}; "
        f"batch size: {task.batch_size}; seed: {task.seed}",
        "- Aggregation: sample-weighted FedAvg, each parameter group (generator, discriminator) averaged separately",
        "- Privacy: only weight arrays and scalar metrics left the sites. Site training is **not** "
        "differentially private in this version (DP-SGD is tracked separately).",
        "- Metrics are computed by every site on its own held-out (test) split and averaged by sample count: "
        "`swd` is the sliced Wasserstein distance between multi-scale 7×7 patches of generated and real "
        "slices, `intensity-w1` the Wasserstein-1 distance between their pixel-value distributions "
        "(both lower is better; 0 = identical distributions).",
        "",
        "## Rounds",
        "",
        "| round | sites | " + " | ".join(name for name, _ in COLUMNS) + " | left out |",
        "|---:|---:|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for record in records:
        sites = len(record.get("sites", []))
        values = [_fmt(record.get(kind, {}).get(name)) for name, kind in COLUMNS]
        excluded = "; ".join(f"node {e['node']}: {e['reason']}" for e in record.get("excluded", [])) or ""
        lines.append(f"| {record['round']} | {sites} | " + " | ".join(values) + f" | {excluded} |")
    swd = [(r["round"], r.get("evaluate", {}).get("swd")) for r in records if r.get("evaluate", {}).get("swd") is not None]
    if len(swd) >= 2:
        (first_round, first), (last_round, last) = swd[0], swd[-1]
        change = 100.0 * (last - first) / first if first else float("nan")
        lines += ["", f"Held-out SWD went from {first:.4f} (round {first_round}) to {last:.4f} (round {last_round}): {change:+.1f} %."]
    lines += ["", "## Generated samples", ""]
    shown = sorted({r["round"] for r in records} & {0, 1, records[-1]["round"] if records else 0})
    for record in records:
        if record["round"] in shown:
            lines += [f"Round {record['round']}:", "", f"![round {record['round']}]({record['samples']})", ""]
    lines += ["## Files", "", "- `config.toml`: the exact settings of this run", "- `metrics.jsonl`: one line per round (per-site metrics included)"]
    if records:
        lines.append(f"- `checkpoints/`: global weights per round (safetensors); final: `{records[-1]['checkpoint']}`")
        lines.append("- `samples/`: a PNG grid of generated slices per round")
    text = "\n".join(lines) + "\n"
    atomic_write_text(folder.report, text)
    return text
