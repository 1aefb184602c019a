"""The ``medgan`` command line: a thin assembly of the hospital's commands (``client.commands``),
the coordinator's (``server.commands``), and the one-machine demo that runs both sides."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from client.commands import adapt_command, infer_command, site_app, synth_command
from medgan_core.study_config import StudyConfig, load_study
from medgan_core.console import console, fail
from medgan_core.data.simulate import (
    MR_MATRIX,
    SERIES,
    find_sites,
    missing_series,
    remove_simulated_study,
    series_for,
    simulate_study,
    stale_simulation,
)
from medgan_core.errors import ConfigError, MedGANError
from medgan_core.site_label import site_label
from rich.markup import escape
from medgan_core.tasks.registry import task_class, task_config_from_items, task_names
from server.commands import certs_app, export, privacy_app, report, resumed_study, run, server_app

if TYPE_CHECKING:
    from server.study import RoundSummary  # imports Flower: only where a demo runs

DEFAULT_CONFIG = Path("sites_example/demo.toml")


def left_out_line(excluded: dict) -> str:
    """The console line of a site left out of a round. Its reason is the site's own text:
    printed as it came, never read as console markup (a site could otherwise style, hide or
    link text in the coordinator's terminal)."""
    label = site_label(int(excluded["node"]), str(excluded.get("site", "")))
    return f"  [red]left out {escape(label)}:[/] {escape(str(excluded['reason']))}"
# Demo sites: ~340 training slices each. DP-SGD needs data: noise per step shrinks with N.
DEMO_SUBJECTS, DEMO_SLICES, DEMO_SIZE = 24, 20, 512  # clinical geometry: 0.78 mm pixels


app = typer.Typer(help="MedGAN-FL: federated, privacy-preserving GANs for medical imaging.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
sites_app = typer.Typer(help="Site data: simulate multi-site phantom studies.", no_args_is_help=True)
app.add_typer(sites_app, name="sites")
app.add_typer(privacy_app, name="privacy")
app.add_typer(certs_app, name="certs")
app.add_typer(site_app, name="site")
app.add_typer(server_app, name="server")
study_app = typer.Typer(help="Studies on one machine: is a federation worth joining?", no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("compare")
def study_compare(
    config: Path = typer.Option(..., "--config", help="The study TOML to compare."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for every arm's run and the results."),
    sites_dir: Optional[Path] = typer.Option(None, "--sites-dir", help="Override run.sites-dir."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Override run.rounds."),
    local_steps: Optional[int] = typer.Option(None, "--local-steps", min=1, help="Override task.local-steps."),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0, help="Override task.seed: the initial model and every site's batches."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds",
        help="The whole comparison at each of these seeds (comma-separated, e.g. 0,1,2), each in OUT/seed-N (one "
             "finished there earlier by the same comparison is kept), and how far each number moves with the seed "
             "in OUT/results.md."),
    privacy: Optional[bool] = typer.Option(None, "--privacy/--no-privacy", help="Override privacy.enabled."),
    leave_one_out: bool = typer.Option(False, "--leave-one-out", help="Also federate without each site, applied to it."),
    epsilons: str = typer.Option(
        "1,4", "--epsilons",
        help="With DP on: the further target ε values of the ε–utility curve, comma-separated ('none': only the "
             "configured one); the federation also runs once without DP, the curve's ceiling."),
    self_ensemble: bool = typer.Option(
        True, "--self-ensemble/--no-self-ensemble",
        help="Score with the task's test-time self-ensemble (denoise: 8 flips/turns averaged); off: every arm "
             "without it, an eighth of the whole-slice inference."),
    eval_slices: Optional[int] = typer.Option(
        None, "--eval-slices", min=0,
        help="Override task.eval-slices: the held-out slices each site scores, evenly spaced (0: all of them; a "
             "demo's few keep its rounds short, a comparison wants every one)."),
) -> None:
    """Train the study, local-only and pooled on the same budget; score every site's held-out split."""
    from medgan.compare import compare_study
    from medgan.compare_seeds import compare_seeds, parse_seeds

    try:
        if seeds is not None and seed is not None:
            raise ConfigError("give --seed N or --seeds A,B,…, not both")
        seed_list = parse_seeds(seeds) if seeds is not None else []
        study = _demo_config(config, rounds, local_steps, sites_dir, None, "cpu", seed)
        if privacy is not None:
            study = study.replace(privacy={"enabled": privacy})
        if eval_slices is not None:
            if not hasattr(study.task.params, "eval_slices"):
                raise ConfigError(f"--eval-slices: task {study.task.name!r} scores whole outputs, not held-out "
                                  "slices (it has no task.eval-slices)")
            study = study.replace(task={"eval_slices": eval_slices})
        sites = find_sites(Path(study.run.sites_dir)) if Path(study.run.sites_dir).exists() else []
        if len(sites) < 2:
            raise MedGANError(f"{study.run.sites_dir} holds {len(sites)} site(s); a comparison needs at least two")
        study = study.replace(run={"num_sites": len(sites)})
        arguments = dict(leave_one_out=leave_one_out, epsilons=parse_epsilons(epsilons), self_ensemble=self_ensemble,
                         command=shlex.join(["medgan", *sys.argv[1:]]), progress=console.print)
        if seed_list:
            results = compare_seeds(study, sites, out, seed_list, **arguments)
        else:
            results = compare_study(study, sites, out, **arguments)
    except MedGANError as exc:
        fail(exc)
    console.print((out / "results.md").read_text())
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}; task {results['task']}")


def parse_epsilons(text: str) -> list[float]:
    """``--epsilons``: positive numbers, comma-separated, or ``none``."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MedGANError(f"--epsilons {text!r}: give positive numbers separated by commas, or 'none'") from None
    if any(not value > 0 or value == float("inf") for value in values):
        raise MedGANError(f"--epsilons {text!r}: every ε must be a positive finite number")
    return values


@sites_app.command("simulate")
def sites_simulate(
    out: Path = typer.Option(..., "--out", help="Folder to write the study into (one sub-folder per site)."),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of hospitals."),
    subjects: int = typer.Option(10, "--subjects", min=3, help="Subjects per site (split 70/10/20 into train/val/test)."),
    slices: int = typer.Option(16, "--slices", min=1, help="Axial slices per volume."),
    size: int = typer.Option(512, "--size", min=32,
                             help="CT matrix over the 400 mm field of view (512: 0.78 mm pixels)."),
    mr_matrix: int = typer.Option(MR_MATRIX, "--mr-matrix",
                                  help="MR matrix over the same field (384: 1.04 mm pixels; at most --size)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantom model and the scanners' noise."),
    series: str = typer.Option(",".join(SERIES), "--series",
                               help=f"Series groups to write, comma-separated (of {', '.join(SERIES)})."),
    task: Optional[str] = typer.Option(None, "--task", help="Write only the series this task reads (e.g. denoise)."),
    force: bool = typer.Option(False, "--force",
                               help="Replace the simulated sites of a study in --out (other folders stay)."),
) -> None:
    """Write a multi-site study: CT as DICOM series, MR as NIfTI, a manifest.csv per site."""
    try:
        groups = tuple(filter(None, (part.strip() for part in series.split(","))))
        if task is not None:  # a task that reads one modality only (recon: MR) is given it
            modalities = task_class(task).modalities if task in task_names() else ()
            config = task_config_from_items({"name": task, **({"modality": modalities[0]} if modalities else {})},
                                            "--task")
            groups = series_for(task_class(task).data_spec(config), config.modality)
        _simulate(out, sites, subjects, slices, size, seed, force, groups, mr_matrix)
    except MedGANError as exc:
        fail(exc)


def _simulate(out: Path, sites: int, subjects: int, slices: int, size: int, seed: int, force: bool,
              series: tuple[str, ...] = SERIES, mr_matrix: int = MR_MATRIX) -> list[Path]:
    if (out / "study.json").exists():
        if not force:
            raise MedGANError(f"{out} already holds a study; pass --force to replace its simulated sites")
        kept = remove_simulated_study(out)  # only folders the simulator marked; user files stay
        for folder in kept:
            console.print(f"  [yellow]kept[/] {escape(str(folder))}: not written by the simulator", markup=True)
    started = time.monotonic()
    with console.status("simulating sites…") as status:
        folders = simulate_study(out, n_sites=sites, n_subjects=subjects, n_slices=slices, size=size, seed=seed,
                                 progress=lambda text: status.update(f"simulating {text}"), series=series,
                                 mr_matrix=mr_matrix)
    for folder in folders:
        console.print(f"  [green]✓[/] {escape(str(folder))}  ({escape(str(folder / 'manifest.csv'))})", markup=True)
    console.print(f"{len(folders)} site(s) written to {out} in {time.monotonic() - started:.1f} s")
    return folders


@app.command()
def demo(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="Study TOML ([run] and [task] tables)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Override run.rounds."),
    local_steps: Optional[int] = typer.Option(None, "--local-steps", min=1, help="Override task.local-steps."),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0,
        help="Override task.seed: the initial model, every site's batches and, where the demo simulates them, its sites."),
    sites_dir: Optional[Path] = typer.Option(None, "--sites-dir", help="Override run.sites-dir."),
    out: Optional[Path] = typer.Option(None, "--out", help="Override run.out-dir (the run folder)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (override run.device)."),
    privacy: Optional[bool] = typer.Option(None, "--privacy/--no-privacy", help="Override privacy.enabled."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder after its last complete round."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's own logs."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="HOST:PORT of a running Ray head: run the sites on that cluster (README)."),
) -> None:
    """Simulate the sites if needed, then run a federated study in Flower's simulation engine."""
    try:
        if resume is not None:
            study = _resumed_config(resume, device, {"--rounds": rounds, "--local-steps": local_steps, "--seed": seed,
                                                     "--sites-dir": sites_dir, "--out": out,
                                                     "--privacy/--no-privacy": privacy})
        else:
            study = _demo_config(config, rounds, local_steps, sites_dir, out, device, seed)
            if privacy is not None:
                study = study.replace(privacy={"enabled": privacy})
        _run_demo(study, verbose, ray_address)
    except MedGANError as exc:
        fail(exc)


def _resumed_config(resume: Path, device: Optional[str], changes: dict[str, object]) -> StudyConfig:
    """The study of ``resume`` as it started, moved to ``device`` if given. Any other change is
    refused: a resumed run that changed its study (DP off, say) would not be the run it says."""
    given = [flag for flag, value in changes.items() if value is not None]
    if given:
        raise ConfigError(f"--resume continues {resume} with the study it started with; "
                          f"{', '.join(given)} cannot change it (start a new run to change it)")
    study = resumed_study(resume)
    return study.replace(run={"device": device}) if device is not None else study


def _demo_config(config: Path, rounds: Optional[int], local_steps: Optional[int], sites_dir: Optional[Path],
                 out: Optional[Path], device: Optional[str], seed: Optional[int] = None) -> StudyConfig:
    study = load_study(config)
    run_changes = {k: v for k, v in (("rounds", rounds), ("device", device),
                                     ("sites_dir", str(sites_dir) if sites_dir else None),
                                     ("out_dir", str(out) if out else None)) if v is not None}
    task_changes = {k: v for k, v in (("local_steps", local_steps), ("seed", seed)) if v is not None}
    return study.replace(run=run_changes, task=task_changes)


def _run_demo(study: StudyConfig, verbose: bool, ray_address: str | None = None) -> None:
    from medgan.live import SiteBoard
    from medgan.simulation import simulate_federation  # Flower and Ray load only when needed
    from server.run_folder import RunFolder

    sites_dir = Path(study.run.sites_dir)
    sites = find_sites(sites_dir) if sites_dir.exists() else []
    simulated_here = (sites_dir / "study.json").exists()
    series = series_for(task_class(study.task.name).data_spec(study.task), study.task.modality)
    if simulated_here and (stale := stale_simulation(sites_dir) or missing_series(sites_dir, series, study.task.name)):
        raise MedGANError(stale)
    if not sites and not simulated_here:
        console.print(f"No study in {sites_dir}: simulating one of {study.run.num_sites} sites.")
        sites = _simulate(sites_dir, study.run.num_sites, DEMO_SUBJECTS, DEMO_SLICES, DEMO_SIZE, study.task.seed,
                          force=False, series=series)
    elif len(sites) != study.run.num_sites:  # never delete a user's sites to make the count fit
        raise MedGANError(
            f"{sites_dir} holds {len(sites)} site(s) but run.num-sites = {study.run.num_sites}; use another "
            f"--sites-dir, or replace a simulated study with 'medgan sites simulate --force --sites "
            f"{study.run.num_sites} --out {sites_dir}'")
    run_dir = Path(study.run.out_dir)
    RunFolder(run_dir).check_free()  # a run already using the folder is refused here, in one line
    if study.run.resume:
        console.print(f"Resuming {run_dir} after round {RunFolder(run_dir).resume_point()[0]}.")
    else:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            console.print(f"An earlier run in {run_dir} is moved aside to {run_dir.name}.N first.")
    console.print(f"[bold]Federated {study.task.name}[/] · {len(sites)} sites · {study.run.rounds} rounds · "
                  f"{study.task.local_steps} local steps · run folder {escape(str(run_dir))}", markup=True)
    from medgan import private_network

    if ray_address:
        console.print(f"Network: the Ray cluster at {ray_address} (its sites refuse to train unless its nodes are on "
                      "loopback or ask for a token over TLS)")
    else:
        console.print("Network: " + ("private namespace, loopback only (nothing outside can reach the simulation)"
                                     if private_network.inside() else
                                     "shared with this machine; Ray listens on 127.0.0.1 only"))
    privacy = study.privacy
    if privacy.enabled:
        console.print(f"Privacy: DP-SGD at every site, budget ε = {privacy.target_epsilon:g} at δ = {privacy.delta:g}"
                      + (f"; central DP σ = {privacy.central_noise_multiplier:g}" if privacy.central_noise_multiplier else ""))
    else:
        console.print("[yellow]Privacy: differential privacy is OFF for this study.[/]", markup=True)
    headline = task_class(study.task.name).headline_metric  # the task says which score leads
    first: dict[str, float] = {}

    def show(summary: RoundSummary) -> None:
        console.print(round_line(summary, headline, first, len(sites), study.aggregation.finetune_steps), markup=True)
        for excluded in summary.excluded:
            console.print(left_out_line(excluded), markup=True)

    started = time.monotonic()
    with console.status("starting the simulation…") as status:
        board = SiteBoard(study.run.rounds, show=lambda _: status.update(board),  # re-rendered as it spins
                          note=lambda text: console.print(f"  [red]{escape(text)}[/]", markup=True))
        simulate_federation(study, sites, run_dir, progress=show, verbose=verbose, ray_address=ray_address,
                            watch=board)
    console.print(f"Done in {time.monotonic() - started:.0f} s.")
    console.print(f"  report:      {run_dir / 'report.md'}")
    console.print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    console.print(f"  checkpoints: {run_dir / 'checkpoints'}")
    start = f"run.initial-model {Path(study.run.initial_model).name}" if study.run.initial_model else "untrained"
    last = "the federated model, before the sites' fine-tune" if study.aggregation.finetune_steps else "final model"
    console.print(f"  samples:     {run_dir / 'samples'}  (round-000.png = {start}, last = {last})")
    console.print(f"  privacy:     medgan privacy report {run_dir}")


def round_line(summary: RoundSummary, headline: str, first: dict[str, float], n_sites: int,
               finetune_steps: int = 0) -> str:
    """The demo's one line per round (rich markup). ``first`` keeps the first score seen, to
    compare against; the last round of a study with a personal fine-tune says that its scores
    are the fine-tuned models', since the sites score those there, not the global model."""
    score = summary.evaluate.get(headline)  # absent where sites keep held-out scores to themselves
    if score is not None:
        first.setdefault(headline, score)
    parts = [f"Round {summary.server_round:>2}/{summary.rounds}", f"sites {summary.sites_ok}/{n_sites}"]
    if "loss-d" in summary.train and "loss-g" in summary.train:  # sent only without DP
        parts.append(f"D {summary.train['loss-d']:.3f} · G {summary.train['loss-g']:.3f}")
    if score is not None:
        parts.append(f"held-out {headline.upper()} {score:.4f} (round 0: {first[headline]:.4f})")
    if "epsilon" in summary.train:
        parts.append(f"ε {summary.train['epsilon']:.2f}")
    parts.append(f"{summary.seconds:.1f} s")
    if summary.server_round == 0:
        label = "initial model"
    elif finetune_steps and summary.server_round == summary.rounds:
        label = f"each site's model after its {finetune_steps}-step fine-tune"
    else:
        label = ""
    return escape("  " + " · ".join(parts)) + (f" [dim]{label}[/]" if label else "")


@app.command("app-hash")
def app_hash_command() -> None:
    """The SHA-256 of the study app this checkout would run: what a site pins as app-hash in site.toml."""
    from client.supernode_guard import app_hash
    from medgan_core.runtime import APP_DIR

    try:
        console.print(app_hash(APP_DIR))
    except MedGANError as exc:
        fail(exc)


app.command("run")(run)  # the coordinator's: submit a study to the federation
app.command("report")(report)
app.command("export")(export)  # the coordinator's (or a site's, with its own layers): a model file
app.command("infer")(infer_command)  # a hospital's: apply a model to its scans
app.command("synth")(synth_command)  # synthetic images from a synthesis model
app.command("adapt")(adapt_command)  # a hospital outside the study: fit the site-kept layers to its images


def main() -> None:
    """The ``medgan`` entry point: a MedGANError is one line (exit 2); anything unexpected
    is one line too (exit 1), with the traceback only when MEDGAN_DEBUG=1."""
    import os
    import sys

    from medgan import private_network

    joins_cluster = any(arg.startswith("--ray-address") for arg in sys.argv[2:])  # its head is outside
    if sys.argv[1:2] == ["demo"] and not joins_cluster and not private_network.inside() and private_network.available():
        # Defence in depth beside Ray on 127.0.0.1: the demo runs where only loopback exists.
        sys.exit(private_network.run_inside(["-m", "medgan.cli", *sys.argv[1:]]))
    if private_network.inside():
        private_network.loopback_up()
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except MedGANError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("MEDGAN_DEBUG") == "1":
            raise
        console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))} "
                      "(set MEDGAN_DEBUG=1 for the traceback, and please report it)", markup=True)
        sys.exit(1)


__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
