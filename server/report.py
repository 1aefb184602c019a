"""report.md: a run's story in one page — settings, per-round metrics, sample grids, files."""

from __future__ import annotations

from typing import Any

from medgan_core.study_config import StudyConfig
from medgan_core.fileio import atomic_write_text
from medgan_core.site_label import markdown_text, site_label
from medgan_core.tasks.registry import build_task, geometry_words, task_class
from server.run_folder import RunFolder

def _columns(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Training losses, ε spent, then every held-out metric the sites reported."""
    train = sorted({k for r in records for k in r.get("train", {}) if k.startswith("loss")})
    evaluate = sorted({k for r in records for k in r.get("evaluate", {})})
    has_epsilon = any("epsilon" in r.get("train", {}) for r in records)
    return [(k, "train") for k in train] + ([("epsilon", "train")] if has_epsilon else []) + [(k, "evaluate") for k in evaluate]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def aggregation_line(study: StudyConfig) -> str:
    """How the groups were combined, in words (from the same settings the server used)."""
    from medgan_core.policies.registry import LOCAL, policy_class

    agg = study.aggregation

    def words(policy: str) -> str:
        return "kept at each site (never sent)" if policy == LOCAL else policy_class(policy)(agg).describe()

    policies = agg.policies(list(build_task(study.task).groups))
    line = "- Aggregation: " + ", ".join(f"{g}: {words(p)}" for g, p in policies.items())
    if agg.local_norm:
        line += "; normalisation layers kept at each site (FedBN)"
    if agg.local_calibration:
        line += "; site-calibration layers (output gain and offset) kept at each site"
    if agg.server_optimizer != "fedavg":
        line += f"; server optimiser {agg.server_optimizer} (η = {agg.server_lr:g})"
    if agg.server_momentum > 0:
        line += f"; server momentum β = {agg.server_momentum:g} (FedAvgM)"
    if agg.proximal_mu > 0:
        line += f"; FedProx μ = {agg.proximal_mu:g}"
    if agg.ditto_steps:
        line += (f"; every round each site also trains its own Ditto personal model for {agg.ditto_steps} steps, "
                 f"pulled towards the global model (λ = {agg.ditto_lambda:g}), and keeps it (held-out metrics are "
                 "those personal models')")
    if agg.keep_optimizer_state:
        line += "; sites keep their optimiser state between rounds"
    if agg.finetune_steps:
        line += (f"; after the last round each site fine-tunes its model for {agg.finetune_steps} steps on its own "
                 "data and keeps it (the last round's held-out metrics are those personal models')")
        if agg.finetune_validate_every and not study.privacy.enabled and task_class(study.task.name).validates:
            line += (f", the best of it on the site's validation subjects, scored every "
                     f"{agg.finetune_validate_every} steps")
    if agg.local_norm or agg.local_calibration or "local" in policies.values():
        line += (". Local arrays stay at the sites: held-out metrics use each site's own model, while the "
                 "checkpoints and sample grids hold the server's initial values for them")
    return line


def write_report(folder: RunFolder, study: StudyConfig) -> str:
    spec = task_class(study.task.name)  # what the task's metrics mean, and which one leads
    records = folder.read_metrics()
    run, task, privacy = study.run, study.task, study.privacy
    columns = _columns(records)
    if privacy.enabled:
        privacy_line = (f"- Privacy: only weight arrays and scalar metrics left the sites; DP-SGD at every site "
                        f"with a budget of ε = {privacy.target_epsilon:g} at δ = {privacy.delta:g} "
                        "(`medgan privacy report` for ε per site and round)")
        if privacy.central_noise_multiplier > 0:
            privacy_line += f"; central DP on the aggregate (σ = {privacy.central_noise_multiplier:g})"
        if privacy.secagg:
            privacy_line += "; secure aggregation (SecAgg+)"
    else:
        privacy_line = ("- Privacy: only weight arrays and scalar metrics left the sites. Differential privacy was "
                        "**off** for this study.")
    lines = [
        f"# MedGAN-FL run: {task.name}",
        "",
        f"- Task: `{task.name}` on {task.modality} slices, " + geometry_words(task),
        f"- Sites: {run.num_sites}; rounds: {run.rounds}; local steps per round: {task.local_steps}; "
        f"batch size: {task.batch_size}; seed: {task.seed}",
        aggregation_line(study),
        privacy_line,
        "- Metrics are computed by every site on its own held-out (test) split and averaged by sample count. "
        + spec.note(),
        "",
        "## Rounds",
        "",
        "| round | sites | " + " | ".join(name for name, _ in columns) + " | left out |",
        "|---:|---:|" + "---:|" * len(columns) + "---|",
    ]
    for record in records:
        sites = len(record.get("sites", []))
        values = [_fmt(record.get(kind, {}).get(name)) for name, kind in columns]
        notes = [f"{markdown_text(site_label(e['node'], e.get('site', '')))}: {markdown_text(e['reason'])}"
                 for e in record.get("excluded", [])]  # the sites' own words, as text
        if record.get("round-failed"):
            notes.append(f"model unchanged: {markdown_text(record['round-failed'])}")
        excluded = "; ".join(notes)
        lines.append(f"| {record['round']} | {sites} | " + " | ".join(values) + f" | {excluded} |")
    key = spec.headline_metric
    if key:
        label = f"Held-out `{key}`"
        series = [(r["round"], r["evaluate"][key]) for r in records if key in r.get("evaluate", {})]
        if len(series) >= 2:
            (first_round, first), (last_round, last) = series[0], series[-1]
            lines += ["", f"{label} went from {first:.4f} (round {first_round}) to {last:.4f} (round {last_round})."]
    lines += ["", "## Generated samples", ""]
    drawn = [r for r in records if "samples" in r]  # rounds the study evaluated (run.evaluate-every)
    shown = sorted({r["round"] for r in drawn} & {0, 1, drawn[-1]["round"] if drawn else 0})
    if records and not drawn:
        lines += ["None: no round was evaluated (`run.evaluate-every = 0`).", ""]
    for record in drawn:
        if record["round"] in shown:
            lines += [f"Round {record['round']}:", "", f"![round {record['round']}]({record['samples']})", ""]
    lines += ["## Files", "", "- `config.toml`: the exact settings of this run", "- `metrics.jsonl`: one line per round (per-site metrics included)"]
    if records:
        lines.append(f"- `checkpoints/`: global weights per round (safetensors); final: `{records[-1]['checkpoint']}`")
        lines.append("- `samples/`: a PNG grid per evaluated round (synthesis: generated slices; image-to-image tasks: rows "
                     "of input | output | target on the coordinator's own phantom slices, never patient data)")
    text = "\n".join(lines) + "\n"
    atomic_write_text(folder.report, text)
    return text
