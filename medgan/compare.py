"""``medgan study compare``: is this federation worth joining? The study against its alternatives.

On the same budget of local steps and the same sites (simulation):
- ``federated``: the study as configured, each site scored with its own model (the global
  arrays plus any it kept at home);
- ``local only``: every site trains alone (every group kept local), same rounds and steps
  (with Ditto, a round's local steps and its personal model's, all on the one local model);
- ``pooled``: one model on all sites' training images together, as many steps as all sites
  took (the ceiling a federation tries to reach; no DP, since the images would have left);
- with ``--leave-one-out``, for each site: the federation of the others applied to it, and
  each other site's local model applied to it;
- with DP on, the ε–utility curve: the federated study again at each further target ε
  (``epsilons``, the noise derived for each) and once without DP, the ceiling its privacy
  costs against. Each point is placed at the ε the sites actually spent (the largest).
Every arm is scored on every site's held-out split by the task's own ``evaluate``, once, after
it trained: the arms' runs do no held-out evaluation of their own (``run.evaluate-every = 0``).
``self_ensemble=False`` scores every arm without the task's test-time self-ensemble (an eighth
of the whole-slice inference; the arms are compared alike; a task without one is unaffected).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medgan_core.checkpoints import load_checkpoint
from medgan_core.config import SiteConfig
from medgan_core.data.dataset import SiteData
from medgan_core.errors import MedGANError
from medgan_core.fileio import atomic_write_text
from medgan_core.run_layout import RunLayout
from medgan_core.runtime import cpu_model
from medgan_core.site_round import load_site_model
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task, load_task_data, task_class
from medgan.simulation import simulate_federation
from server.privacy_report import collect, final_epsilons
from server.run_folder import RunFolder
from server.warm_start import start_from_initial_model

Progress = Callable[[str], None]


NO_DP = "federated, no DP"
LOWER_IS_BETTER = frozenset({"swd", "fid", "kid", "mae-hu", "nmse"})
#: What a hospital joins for (issue 24): at least local-only everywhere, near pooling, and worth
#: keeping under DP at ε = 8.
POOLED_SHARE_TARGET, DP_SHARE_TARGET, DP_TARGET_EPSILON = 0.95, 0.85, 8.0


def compare_study(study: StudyConfig, sites: list[Path], out: Path, *, leave_one_out: bool = False,
                  epsilons: Sequence[float] = (), self_ensemble: bool = True, command: str = "",
                  progress: Progress = print) -> dict[str, Any]:
    """Every arm trained and scored; ``results.json``, ``results.md`` and plots written to ``out``
    (``command``: the command line that asked for it, recorded with the machine it ran on)."""
    if len(sites) < 2:
        raise MedGANError("a comparison needs at least two sites")
    if any(not eps > 0 for eps in epsilons):
        raise MedGANError(f"--epsilons {','.join(f'{e:g}' for e in epsilons)}: every ε must be positive")
    options = comparison_options(leave_one_out, epsilons, self_ensemble)  # as asked, before the study's own key
    out.mkdir(parents=True, exist_ok=True)
    headline = task_class(study.task.name).headline_metric
    has_ensemble = bool(getattr(task_class(study.task.name), "self_ensemble", False))
    self_ensemble = self_ensemble and bool(getattr(study.task.params, "self_ensemble", True))  # the study's own key
    data = {site.name: load_task_data(site, study.task) for site in sites}
    scores: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}

    run_dirs: dict[str, Path] = {}

    def score(model: Task, site: str, arm: str) -> dict[str, float]:
        progress(f"{arm}: scoring {site}'s held-out slices")
        if not self_ensemble and getattr(model, "self_ensemble", False):
            model.self_ensemble = False  # type: ignore[misc]
        return model.evaluate(data[site])

    def federate(arm: str, arm_study: StudyConfig, arm_sites: list[Path], personal: bool = True) -> dict[str, Task]:
        started = time.monotonic()
        run_dir = run_dirs[arm] = out / arm.replace(" ", "-")
        simulate_federation(arm_study.replace(run={"evaluate_every": 0}), arm_sites, run_dir,
                            progress=lambda s: progress(f"{arm}: round {s.server_round}/{arm_study.run.rounds}"))
        seconds[arm] = time.monotonic() - started
        return site_models(arm_study, arm_sites, run_dir, personal=personal)

    def scored_arm(arm: str, arm_study: StudyConfig) -> dict[str, Task]:
        """An arm on every site, each site's model scored on its own held-out split."""
        models = federate(arm, arm_study, sites)
        scores[arm] = {name: score(model, name, arm) for name, model in models.items()}
        return models

    scored_arm("federated", study)
    curve: list[dict[str, Any]] = []
    if study.privacy.enabled:
        curve.append({"arm": "federated", "target-epsilon": study.privacy.target_epsilon,
                      "epsilon-spent": spent_epsilon(run_dirs["federated"])})
        for eps in sorted(set(epsilons) - {study.privacy.target_epsilon}):
            arm = f"federated, ε={eps:g}"
            scored_arm(arm, study.replace(privacy={"target_epsilon": eps, "noise_multiplier": 0.0}))
            curve.append({"arm": arm, "target-epsilon": eps, "epsilon-spent": spent_epsilon(run_dirs[arm])})
        scored_arm(NO_DP, study.replace(privacy={"enabled": False}))
        curve.sort(key=lambda point: point["epsilon-spent"])
    local = scored_arm("local only", study.replace(
        aggregation={"policy": "local", "group_policies": "", "server_optimizer": "fedavg", "server_momentum": 0.0,
                     "ditto_steps": 0},
        task={"local_steps": steps_a_round(study)},  # a Ditto site's personal steps, as its own
        privacy={"secagg": False, "central_noise_multiplier": 0.0}))
    progress("pooled: training on every site's images together")
    started = time.monotonic()
    pooled = pooled_model(study, list(data.values()))
    seconds["pooled"] = time.monotonic() - started
    scores["pooled"] = {name: score(pooled, name, "pooled") for name in data}
    held_out: dict[str, dict[str, Any]] = {}
    if leave_one_out:
        for site in sites:
            others = [s for s in sites if s != site]
            arm_study = study.replace(run={"num_sites": len(others)})
            # The shared arrays (a site-kept layer is not the held-out site's; no one's personal model)
            arm = f"without {site.name}"
            models = federate(arm, arm_study, others, personal=False)
            any_model = next(iter(models.values()))
            held_out[site.name] = {
                "federated (others)": score(any_model, site.name, arm),
                "single sites": {other: score(local[other], site.name, f"local only at {other}") for other in models},
            }
    results = {"task": study.task.name, "headline": headline, "privacy": study.privacy.enabled,
               "delta": study.privacy.delta, "initial-model": Path(study.run.initial_model).name or None,
               "rounds": study.run.rounds, "local-steps": study.task.local_steps, "seed": study.task.seed,
               "ditto-steps": study.aggregation.ditto_steps, "sites": [s.name for s in sites],
               "self-ensemble": self_ensemble if has_ensemble else None,
               "eval-slices": getattr(study.task.params, "eval_slices", 0), "scores": scores, "leave-one-out": held_out, "epsilon-utility": curve,
               "seconds": seconds, "command": command, "machine": machine(),
               "study": study.to_dict(), "options": options}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", _markdown(results))
    _plot(results, out, progress)
    return results


def comparison_options(leave_one_out: bool, epsilons: Sequence[float], self_ensemble: bool) -> dict[str, Any]:
    """What, beside the study, decides a comparison's numbers (recorded, so that ``--seeds`` can
    tell a finished seed of the same comparison from another's)."""
    return {"leave-one-out": leave_one_out, "epsilons": sorted(set(epsilons)), "self-ensemble": self_ensemble}


def machine() -> str:
    """What the seconds in the results were measured on."""
    return (f"{os.cpu_count()} CPUs ({cpu_model()}, {platform.machine()}), {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}")


def spent_epsilon(run_dir: Path) -> float:
    """The largest ε any site of a DP run had spent by its last reported round."""
    last = final_epsilons(collect(RunFolder(run_dir))[0])
    if not last:
        raise MedGANError(f"{run_dir} reports no ε; was DP on?")
    return max(last.values())


def mean_score(results: dict[str, Any], arm: str, key: str) -> float:
    """An arm's held-out ``key`` averaged over the sites."""
    sites = results["sites"]
    return sum(results["scores"][arm][s][key] for s in sites) / len(sites)


def mean_gain(results: dict[str, Any], arm: str, key: str) -> float:
    """An arm's mean gain in ``key`` over the input (image-to-image tasks)."""
    return mean_score(results, arm, key) - mean_score(results, arm, f"{key}-input")


def site_models(study: StudyConfig, sites: list[Path], run_dir: Path,
                weights: dict | None = None, personal: bool = True) -> dict[str, Task]:
    """Each site's final model: the global weights (default: the last checkpoint) plus what the
    site kept at home under ``[aggregation]`` (local groups, FedBN's layers), from its state folder;
    its personal model where it made one (``finetune-steps``, ``ditto-steps``) and ``personal``."""
    layout = RunLayout(run_dir)
    if weights is None:
        weights = load_checkpoint(layout.checkpoint(study.run.rounds))[0]
    study_id = layout.study_id_file.read_text().strip()
    models = {}
    for site in sites:
        task = build_task(study.task)
        task.set_weights(weights)
        load_site_model(task, SiteConfig(str(site), state_dir=str(layout.site_state(site.name))),
                        study.aggregation, study_id=study_id, server_round=study.run.rounds, training=False,
                        personal=personal)
        models[site.name] = task
    return models


def steps_a_round(study: StudyConfig) -> int:
    """The training steps a site takes in a round: its local steps and, with Ditto, its
    personal model's (the budget the local-only and pooled arms get too)."""
    return study.task.local_steps + study.aggregation.ditto_steps


def pooled_model(study: StudyConfig, data: list[SiteData]) -> Task:
    """One model on the union of every site's training images, as many steps as all sites took
    (their personal fine-tunes and Ditto models included)."""
    def joined(field: str) -> torch.Tensor | None:
        parts = [getattr(d, field) for d in data]
        if any(p is None for p in parts):
            return None
        if field.endswith("_subjects"):  # each site numbers its own patients from 0: theirs stay apart
            offsets = torch.cumsum(torch.tensor([0] + [int(p.max()) + 1 if len(p) else 0 for p in parts[:-1]]), 0)
            parts = [p + offset for p, offset in zip(parts, offsets)]
        return torch.cat(parts)

    union = SiteData("pooled", **{f.name: joined(f.name) for f in fields(SiteData) if f.name != "site"})  # type: ignore[arg-type]
    task = build_task(study.task)
    start_from_initial_model(task, study)  # the same start as the federation's (run.initial-model)
    for server_round in range(1, study.run.rounds + 1):
        for site in range(len(data)):
            task.train(union, steps_a_round(study), seed=server_round * 100 + site)
    if study.aggregation.finetune_steps:
        task.train(union, study.aggregation.finetune_steps * len(data), seed=study.run.rounds * 100 + 99)
    return task


def _markdown(results: dict[str, Any]) -> str:
    key = results["headline"]
    arms = list(results["scores"])
    lines = [f"# Is the federation worth joining? Task `{results['task']}`", "",
             f"{len(results['sites'])} sites, {results['rounds']} rounds × {results['local-steps']} local steps"
             + (f" and {results['ditto-steps']} steps of each site's Ditto personal model (local only and pooled: "
                f"{results['local-steps'] + results['ditto-steps']} steps a round)" if results.get("ditto-steps") else "")
             + (f", seed {results['seed']}" if "seed" in results else "")
             + ", "
             f"DP {'on' if results['privacy'] else 'off'} for the federated and local arms (pooled: no DP). "
             f"Held-out `{key}` at each site, each arm's own model there "
             f"({'lower' if key in LOWER_IS_BETTER else 'higher'} is better)."
             + (f" Every arm starts from `{results['initial-model']}` (`run.initial-model`, public data)."
                if results.get("initial-model") else "")
             + ("" if results.get("self-ensemble") is not False else  # None: the task has no self-ensemble
                " Every arm scored without the task's test-time self-ensemble (`--no-self-ensemble`, or `task.self-ensemble = false`).")
             + (f" Each site scores {results['eval-slices']} of its held-out slices, evenly spaced (`task.eval-slices`; "
                "`--eval-slices 0` scores all of them)." if results.get("eval-slices") else ""), "",
             "| site | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for site in results["sites"]:
        lines.append(f"| {site} | " + " | ".join(f"{results['scores'][arm][site].get(key, float('nan')):.3f}"
                                                 for arm in arms) + " |")
    lines.append("| mean | " + " | ".join(f"{mean_score(results, arm, key):.3f}" for arm in arms) + " |")
    input_key = f"{key}-input"
    first = results["scores"]["federated"][results["sites"][0]]
    if input_key in first:  # image-to-image: the gain over the input, and the share of pooling's gain
        gain = {arm: mean_gain(results, arm, key) for arm in arms}
        share = gain["federated"] / gain["pooled"] if gain["pooled"] else float("nan")
        lines += ["", "Mean gain over the input: " + ", ".join(f"{arm} {gain[arm]:+.3f}" for arm in arms)
                  + f". The federation reaches {share:.0%} of pooled training's gain."]
    if results["leave-one-out"]:
        lines += ["", "Leave one site out: the federation of the others, and each single site's own model, "
                  f"applied to the site left out (`{key}`):", "", "| site left out | federated (others) | single sites |",
                  "|---|---:|---|"]
        for site, row in results["leave-one-out"].items():
            singles = ", ".join(f"{name} {s[key]:.3f}" for name, s in row["single sites"].items())
            lines.append(f"| {site} | {row['federated (others)'][key]:.3f} | {singles} |")
    if results["epsilon-utility"]:
        lines += ["", *_curve_markdown(results)]
    lines += ["", *_targets_markdown(results)]
    lines += ["", "Training seconds: " + ", ".join(f"{arm} {s:.0f}" for arm, s in results["seconds"].items()) + "."]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`" + (f"; machine: {results['machine']}." if results.get("machine")
                                                          else ".")]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TargetCheck:
    """One of the targets of a federation worth joining, as one comparison measured it."""

    name: str  # what the target asks
    value: float  # a margin in the headline's units (> 0: the federation is better) or a share of a gain
    threshold: float  # met when ``value`` reaches it
    detail: str  # the number, and where: what a reader checks

    @property
    def met(self) -> bool:
        return self.value >= self.threshold


def check_targets(results: dict[str, Any]) -> list[TargetCheck]:
    """Each target that ``results`` measured, met or missed and by how much (a missed one is what
    the next experiment is for)."""
    key, sites, scores = results["headline"], results["sites"], results["scores"]
    sign = -1.0 if key in LOWER_IS_BETTER else 1.0  # margins > 0: the federation is better
    margins = {site: sign * (scores["federated"][site][key] - scores["local only"][site][key]) for site in sites}
    worst = min(margins, key=margins.__getitem__)
    checks = [TargetCheck("federated ≥ local only at every site", margins[worst], 0.0,
                          f"smallest margin {margins[worst]:+.3f} at {worst}")]
    if f"{key}-input" in scores["federated"][sites[0]]:
        pooled = mean_gain(results, "pooled", key)
        share = mean_gain(results, "federated", key) / pooled if pooled else float("nan")
        checks.append(TargetCheck(f"≥ {POOLED_SHARE_TARGET:.0%} of pooled training's gain", share,
                                  POOLED_SHARE_TARGET, f"{share:.0%}"))
    if results["leave-one-out"]:
        loo = {site: sign * row["federated (others)"][key] - max(sign * s[key] for s in row["single sites"].values())
               for site, row in results["leave-one-out"].items()}
        worst = min(loo, key=loo.__getitem__)
        checks.append(TargetCheck("left out, the federation beats every single-site model", loo[worst], 0.0,
                                  f"smallest margin over the best single site {loo[worst]:+.3f} at {worst}"))
    at_target = [p for p in results["epsilon-utility"] if p["target-epsilon"] == DP_TARGET_EPSILON]
    if at_target and f"{key}-input" in scores["federated"][sites[0]]:
        ceiling = mean_gain(results, NO_DP, key)
        share = mean_gain(results, at_target[0]["arm"], key) / ceiling if ceiling else float("nan")
        checks.append(TargetCheck(f"DP at ε = {DP_TARGET_EPSILON:g} keeps ≥ {DP_SHARE_TARGET:.0%} of the non-DP gain",
                                  share, DP_SHARE_TARGET, f"{share:.0%}"))
    return checks


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def _targets_markdown(results: dict[str, Any]) -> list[str]:
    return ["Targets:", "", *(f"- {check.name}: {verdict(check.met)} ({check.detail})"
                              for check in check_targets(results))]


def _curve_markdown(results: dict[str, Any]) -> list[str]:
    """The ε–utility table: each DP point's held-out mean and, for image-to-image tasks, the
    share of the non-DP federation's gain over the input it keeps (the target is ≥ 85 % at ε = 8)."""
    key = results["headline"]
    has_input = f"{key}-input" in results["scores"]["federated"][results["sites"][0]]

    lines = [f"ε–utility (δ = {results.get('delta', 1e-5):g}; each point at the largest ε a site spent; "
             f"the last row: the same federation without DP):", "",
             f"| target ε | ε spent | mean `{key}` |" + (" share of the non-DP gain |" if has_input else ""),
             "|---:|---:|---:|" + ("---:|" if has_input else "")]
    for point in results["epsilon-utility"]:
        share = ""
        if has_input:
            ceiling = mean_gain(results, NO_DP, key)
            share = f" {mean_gain(results, point['arm'], key) / ceiling:.0%} |" if ceiling else " — |"
        lines.append(f"| {point['target-epsilon']:g} | {point['epsilon-spent']:.2f} | "
                     f"{mean_score(results, point['arm'], key):.3f} |{share}")
    lines.append(f"| no DP | ∞ | {mean_score(results, NO_DP, key):.3f} |" + (" 100% |" if has_input else ""))
    return lines


def _plot(results: dict[str, Any], out: Path, progress: Progress) -> None:
    """``per-site.png``: each arm's held-out score at each site; ``gain.png`` (image-to-image
    tasks): each arm's gain over the input there, the number a hospital joins for."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return
    key, arms, sites = results["headline"], list(results["scores"]), results["sites"]
    charts = {"per-site.png": (key, lambda m: m[key])}
    if f"{key}-input" in results["scores"]["federated"][sites[0]]:
        charts["gain.png"] = (f"{key} gain over the input", lambda m: m[key] - m[f"{key}-input"])
    for name, (label, value) in charts.items():
        figure, axis = plt.subplots(figsize=(3.5 + 1.5 * len(sites), 3.5))
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            axis.bar([s + i * width for s in range(len(sites))], [value(results["scores"][arm][site]) for site in sites],
                     width, label=arm)
        axis.set_xticks([s + 0.4 - width / 2 for s in range(len(sites))], sites, rotation=15)
        axis.set_ylabel(label)
        axis.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")  # beside the bars, never on them
        save_chart(plt, figure, out / name)
    if results["epsilon-utility"]:
        figure, axis = plt.subplots(figsize=(5.5, 3.5))
        points = results["epsilon-utility"]
        axis.plot([p["epsilon-spent"] for p in points], [mean_score(results, p["arm"], key) for p in points],
                  "o-", label="federated, DP (mean)")
        axis.axhline(mean_score(results, NO_DP, key), linestyle="--", color="grey", label="federated, no DP")
        axis.set_xscale("log")
        axis.set_xticks([p["epsilon-spent"] for p in points], [f"{p['epsilon-spent']:.2g}" for p in points])
        axis.minorticks_off()
        axis.set_xlabel("ε spent (largest site)")
        axis.set_ylabel(f"mean held-out {key}")
        axis.legend(fontsize="small")
        save_chart(plt, figure, out / "epsilon-utility.png")


def save_chart(plt: Any, figure: Any, path: Path) -> None:
    """Write a chart whole or not at all (a temporary file, then replace)."""
    figure.tight_layout()
    partial = path.with_name(f".{path.stem}.partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    os.replace(partial, path)
