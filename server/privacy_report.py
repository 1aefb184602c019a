"""``medgan privacy report``: what each site spent, round by round, for a privacy officer.

Everything comes from the run folder: the study's privacy settings (config.toml) and the
scalars each site reported with its update (metrics.jsonl). Sites are named by the name
they announced (``medgan_core.site_label``) and their Flower node id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgan_core.site_label import markdown_text, site_label
from medgan_core.study_config import load_study
from medgan_core.errors import MedGANError
from medgan_core.fileio import atomic_write_text
from server.run_folder import RunFolder

DP_KEYS = ("epsilon", "epsilon-budget", "delta", "noise-multiplier", "max-grad-norm", "sample-rate", "dp-steps")


@dataclass(frozen=True)
class SiteRoundPrivacy:
    server_round: int
    node: int
    values: dict[str, float]
    site: str = ""  # the name the site announced

    @property
    def label(self) -> str:
        return markdown_text(site_label(self.node, self.site))


def collect(folder: RunFolder) -> tuple[list[SiteRoundPrivacy], list[dict[str, Any]]]:
    """Per-site, per-round DP values and every exclusion (e.g. budget reached)."""
    if not folder.metrics.exists():
        raise MedGANError(f"{folder.root} has no metrics.jsonl; is it a MedGAN-FL run folder?")
    rows, excluded = [], []
    for record in folder.read_metrics():
        for site in record.get("sites", []):
            train = site.get("train")
            if train:
                rows.append(SiteRoundPrivacy(record["round"], site["node"], {k: train[k] for k in DP_KEYS if k in train},
                                             str(site.get("site", ""))))
        for item in record.get("excluded", []):
            excluded.append({"round": record["round"], **item})
    return rows, excluded


def final_epsilons(rows: list[SiteRoundPrivacy]) -> dict[int, float]:
    """Each site's ε at the last round it reported one (``rows`` in round order, as ``collect`` gives)."""
    return {row.node: row.values["epsilon"] for row in rows if "epsilon" in row.values}


def site_labels(rows: list[SiteRoundPrivacy]) -> dict[int, str]:
    """How to name each node (as Markdown text): by the last name it announced."""
    names = {row.node: row.site for row in rows if row.site}
    return {row.node: markdown_text(site_label(row.node, names.get(row.node, ""))) for row in rows}


def privacy_report(folder: RunFolder) -> str:
    """Markdown report; also written to ``privacy-report.md`` in the run folder."""
    study = load_study(folder.config)
    privacy = study.privacy
    rows, excluded = collect(folder)
    lines = ["# Privacy report", ""]
    if not privacy.enabled:
        lines += ["**Differential privacy was OFF for this study**: site updates carry no formal guarantee.", ""]
    else:
        lines += [
            f"- Site-level DP-SGD (Opacus) on the modules that read real images; accountant `{privacy.accountant}`, "
            f"δ = {privacy.delta:g}, per-sample clipping norm C = {privacy.max_grad_norm:g}.",
            f"- Target ε = {privacy.target_epsilon:g} over {study.run.rounds} planned rounds × "
            f"{study.task.local_steps} local steps"
            + (f" and {study.aggregation.ditto_steps} steps of each site's Ditto personal model (accounted in its ε; "
               "the personal model never leaves the site)" if study.aggregation.ditto_steps else "")
            + (f", plus {study.aggregation.finetune_steps} steps of each site's personal fine-tune after the last "
               "round (accounted in its ε; the personal model never leaves the site)"
               if study.aggregation.finetune_steps else "")
            + (f"; noise multiplier fixed at σ = {privacy.noise_multiplier:g}." if privacy.noise_multiplier > 0
               else "; each site derives σ from its own sample rate."),
            f"- Noise and sampling randomness: {'OS entropy' if privacy.secure_rng else '**seeded (testing only: not private)**'}.",
            "- **What ε covers**: every training record of a site, through everything the site sent from "
            "training — its weight updates and the mechanism's own bookkeeping (ε, δ, σ, C, q, step count). "
            + ("A record is a **patient**: a batch samples patients and takes one slice of each, so ε is a "
               "patient's, however many slices they have. "
               if privacy.unit == "patient" else
               "A record is a **slice** (`[privacy] unit = \"slice\"`): a patient with k slices in training is "
               "covered only as a group of k, a far weaker guarantee; `unit = \"patient\"` makes ε a patient's. ")
            + "Private networks that step on the same Poisson batch are accounted as one mechanism "
            "(noise multiplier σ/√k for k networks; σ in the table is each network's). Under DP a site sends "
            "no training losses or discriminator scores.",
            "- **What ε does not cover**: the number of records (`num-examples`, needed for weighted averaging) and "
            "held-out scores computed on a site's *test* patients, which leave only where the site's policy allows "
            "them (`release-test-metrics`: on in simulation, off by default in a hospital's site.toml).",
        ]
    if privacy.central_noise_multiplier > 0:
        lines.append(f"- Central DP on the aggregate: clipping {privacy.central_clipping_norm:g}, "
                     f"noise multiplier {privacy.central_noise_multiplier:g} (site-level, equal weights).")
    lines.append(f"- Secure aggregation (SecAgg+): {'on' if privacy.secagg else 'off'}.")
    if study.run.initial_model:
        lines.append(f"- Starting weights: `{Path(study.run.initial_model).name}` (`run.initial-model`), trained "
                     "outside this study; ε covers what the sites' images added from round 1 on, not what that "
                     "model learned from its own data, which must be public.")
    lines += ["", "## ε spent per site and round", "",
              "| round | site (node) | ε spent | budget | δ | σ | C | q | DP steps |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        v = row.values
        lines.append(
            f"| {row.server_round} | {row.label} | {_f(v.get('epsilon'))} | {_f(v.get('epsilon-budget'))} | "
            f"{_f(v.get('delta'), 'g')} | {_f(v.get('noise-multiplier'))} | {_f(v.get('max-grad-norm'))} | "
            f"{_f(v.get('sample-rate'))} | {_f(v.get('dp-steps'), '.0f')} |"
        )
    final, labels = final_epsilons(rows), site_labels(rows)
    if final:
        lines += ["", "Final ε per site: " + ", ".join(f"{labels[n]}: {e:.3f}" for n, e in sorted(final.items()))
                  + f" (max {max(final.values()):.3f})."]
    if excluded:
        lines += ["", "## Sites left out", ""] + [
            f"- round {e['round']}, {markdown_text(site_label(e['node'], e.get('site', '')))}: {markdown_text(e['reason'])}"
            for e in excluded]
    text = "\n".join(lines) + "\n"
    atomic_write_text(folder.privacy_report, text)
    return text


def _f(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)
