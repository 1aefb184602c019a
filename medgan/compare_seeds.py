"""``medgan study compare --seeds``: the comparison at several seeds, and how far each number moves.

One seed's comparison can mislead: on the translate study, pooled training's mean moved 4.6 dB
between seeds while the federation's moved 2.1, so the federation's share of pooling's gain went
from 76 % to 101 %. Each seed here is a whole ``compare_study`` (``task.seed`` = the seed: the
initial model and every site's batches) in ``OUT/seed-N/``; ``OUT/results.json`` and
``results.md`` then give each seed's means, shares and target margins, their mean and range, and
each target met at how many seeds. A seed whose results are already in its folder, from the same
study and options, is kept rather than run again: a crash or a stop in seed 3 costs seed 3 only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from medgan.compare import (
    LOWER_IS_BETTER,
    POOLED_SHARE_TARGET,
    Progress,
    check_targets,
    compare_study,
    comparison_options,
    mean_gain,
    mean_score,
    save_chart,
    verdict,
)
from medgan_core.errors import MedGANError
from medgan_core.fileio import atomic_write_text
from medgan_core.study_config import StudyConfig

ARMS = ("federated", "local only", "pooled")


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: at least two different non-negative integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MedGANError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if any(seed < 0 for seed in seeds):
        raise MedGANError(f"--seeds {text!r}: every seed must be 0 or more")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise MedGANError(f"--seeds {text!r}: give at least two different seeds (one seed: --seed N)")
    return seeds


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def finished_seed(folder: Path, study: StudyConfig, options: dict[str, Any]) -> dict[str, Any] | None:
    """That seed's results, if its folder holds this very comparison finished; ``None`` if it holds
    nothing yet (or an unfinished run, which is run again: its arms' folders are archived, not
    deleted). Another comparison's results are refused rather than overwritten."""
    path = folder / "results.json"
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedGANError(f"{path} cannot be read ({exc}); move it away or choose another --out") from None
    if results.get("study") != _as_json(study.to_dict()) or results.get("options") != _as_json(options):
        raise MedGANError(f"{path} holds another comparison's results (its study or options differ, or are not "
                          "recorded); "
                          "choose another --out, or move that folder away")
    return results


def compare_seeds(study: StudyConfig, sites: list[Path], out: Path, seeds: Sequence[int], *,
                  leave_one_out: bool = False, epsilons: Sequence[float] = (), self_ensemble: bool = True,
                  command: str = "", progress: Progress = print) -> dict[str, Any]:
    """The comparison at every seed, each in ``OUT/seed-N`` (kept if finished), and the summary of
    all of them in ``OUT/results.json``, ``results.md`` and ``seeds.png``."""
    options = comparison_options(leave_one_out, epsilons, self_ensemble)
    unseeded = _as_json(study.to_dict())
    unseeded["task"].pop("seed", None)  # what every seed shares
    summary_path = out / "results.json"
    if summary_path.exists():
        earlier = _read_json(summary_path)
        if "seeds" not in earlier:
            raise MedGANError(f"{summary_path} holds a single comparison's results; choose another --out for --seeds")
        if earlier.get("study") != unseeded or earlier.get("options") != _as_json(options):
            raise MedGANError(f"{summary_path} summarises another comparison (its study or options differ); "
                              "choose another --out, or move that folder away")
    studies = {seed: study.replace(task={"seed": seed}) for seed in seeds}
    per_seed = {seed: finished_seed(seed_folder(out, seed), studies[seed], options) for seed in seeds}  # refuse first
    for index, seed in enumerate(seeds, 1):
        label = f"seed {seed} ({index}/{len(seeds)})"
        if per_seed[seed] is not None:
            progress(f"{label}: finished earlier in {seed_folder(out, seed)}, kept")
            continue
        per_seed[seed] = compare_study(studies[seed], sites, seed_folder(out, seed), leave_one_out=leave_one_out,
                                       epsilons=epsilons, self_ensemble=self_ensemble, command=command,
                                       progress=lambda line, label=label: progress(f"{label}: {line}"))
    summary = summarise({seed: results for seed, results in per_seed.items() if results is not None})
    summary |= {"study": unseeded, "options": _as_json(options), "command": command}
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", seeds_markdown(summary))
    _plot_seeds(summary, out, progress)
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedGANError(f"{path} cannot be read ({exc}); move it away or choose another --out") from None


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per seed: each arm's mean score and site scores, the mean gain over the input (image-to-image
    tasks) and every target's value; over the seeds: each arm's mean, and the share of the mean gains."""
    first = next(iter(per_seed.values()))
    key, sites = first["headline"], first["sites"]
    has_input = f"{key}-input" in first["scores"]["federated"][sites[0]]
    seeds: dict[str, Any] = {}
    for seed, results in per_seed.items():
        seeds[str(seed)] = {
            "means": {arm: mean_score(results, arm, key) for arm in ARMS},
            "gains": {arm: mean_gain(results, arm, key) for arm in ARMS} if has_input else {},
            "sites": {arm: {site: results["scores"][arm][site][key] for site in sites} for arm in ARMS},
            "targets": [{"name": c.name, "value": c.value, "threshold": c.threshold, "met": c.met, "detail": c.detail}
                        for c in check_targets(results)],
        }
    rows = list(seeds.values())
    means = {arm: sum(r["means"][arm] for r in rows) / len(rows) for arm in ARMS}
    summary: dict[str, Any] = {"task": first["task"], "headline": key, "sites": sites, "privacy": first["privacy"],
                               "rounds": first["rounds"], "local-steps": first["local-steps"],
                               "leave-one-out": bool(first["leave-one-out"]), "seeds": seeds, "means": means}
    if has_input:
        gains = {arm: sum(r["gains"][arm] for r in rows) / len(rows) for arm in ARMS}
        summary["gains"] = gains
        summary["pooled-share"] = _share(gains)
    return summary


def seeds_markdown(summary: dict[str, Any]) -> str:
    """The seeds side by side, their mean and range, and each target over the seeds."""
    key, seeds, sites = summary["headline"], summary["seeds"], summary["sites"]
    has_input = "gains" in summary
    names = [t["name"] for t in next(iter(seeds.values()))["targets"]]
    lines = [f"# Is the federation worth joining? Task `{summary['task']}` at {len(seeds)} seeds", "",
             f"{len(sites)} sites, {summary['rounds']} rounds × {summary['local-steps']} local steps, "
             f"DP {'on' if summary['privacy'] else 'off'} for the federated and local arms, seeds "
             f"{', '.join(seeds)} (`task.seed`: the initial model and every site's batches; each seed's whole "
             f"comparison in `seed-N/`). Mean held-out `{key}` of the sites "
             f"({'lower' if key in LOWER_IS_BETTER else 'higher'} is better):", "",
             "| seed | " + " | ".join(ARMS) + (" | share of pooled training's gain" if has_input else "") + " |",
             "|---|" + "---:|" * (len(ARMS) + has_input)]
    for seed, row in seeds.items():
        share = [f"{_share(row['gains']):.0%}"] if has_input else []
        lines.append(f"| {seed} | " + " | ".join([f"{row['means'][arm]:.3f}" for arm in ARMS] + share) + " |")
    spread = {arm: [row["means"][arm] for row in seeds.values()] for arm in ARMS}
    lines.append("| mean | " + " | ".join([f"{summary['means'][arm]:.3f}" for arm in ARMS]
                                         + ([f"{summary['pooled-share']:.0%} (of the mean gains)"] if has_input else []))
                 + " |")
    lines.append("| range | " + " | ".join([f"{max(v) - min(v):.3f}" for v in spread.values()]
                                          + ([_range(_share(r["gains"]) for r in seeds.values())] if has_input else []))
                 + " |")
    lines += ["", "Mean over the seeds at each site (smallest–largest):", "", "| site | " + " | ".join(ARMS) + " |",
              "|---|" + "---:|" * len(ARMS)]
    for site in sites:
        cells = []
        for arm in ARMS:
            values = [row["sites"][arm][site] for row in seeds.values()]
            cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})")
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    lines += ["", "Targets over the seeds:", ""]
    for name in names:
        checks = [next(t for t in row["targets"] if t["name"] == name) for row in seeds.values()]
        missed = sum(not t["met"] for t in checks)
        line = (f"- {name}: " + (f"**missed** at {missed} of {len(checks)} seeds (" if missed
                                  else f"met at all {len(checks)} seeds (")
                + "; ".join(f"seed {seed}: {t['detail']}" for seed, t in zip(seeds, checks)) + ")")
        if name.endswith("of pooled training's gain"):
            line += (f"; over the seeds, the share of the mean gains: {summary['pooled-share']:.0%} "
                     f"({verdict(summary['pooled-share'] >= POOLED_SHARE_TARGET)})")
        lines.append(line)
    if summary.get("command"):
        lines += ["", f"Command: `{summary['command']}`."]
    return "\n".join(lines) + "\n"


def _share(gains: dict[str, float]) -> float:
    """The federation's share of pooled training's gain over the input."""
    return gains["federated"] / gains["pooled"] if gains["pooled"] else float("nan")


def _range(shares: Any) -> str:
    values = list(shares)
    return f"{min(values):.0%}–{max(values):.0%}"


def _plot_seeds(summary: dict[str, Any], out: Path, progress: Progress) -> None:
    """``seeds.png``: each arm's mean held-out score at each seed (dashed: its mean over the seeds),
    so the spread is seen."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        return
    seeds = list(summary["seeds"])
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    for arm in ARMS:  # points, not lines: the seeds are not an axis the scores move along
        points = axis.plot(seeds, [summary["seeds"][seed]["means"][arm] for seed in seeds], "o", label=arm)
        axis.axhline(summary["means"][arm], color=points[0].get_color(), linewidth=0.8, linestyle="--")
    axis.set_xlabel("seed")
    axis.set_ylabel(f"mean held-out {summary['headline']}")
    axis.legend(fontsize="small")
    save_chart(plt, figure, out / "seeds.png")
