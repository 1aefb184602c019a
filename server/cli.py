"""The ``medgan`` command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medgan_core.config import StudyConfig, load_study
from medgan_core.data.simulate import find_sites, remove_simulated_study, simulate_study
from medgan_core.errors import MedGANError

DEFAULT_CONFIG = Path("sites_example/demo.toml")
# Demo sites: ~340 training slices each. DP-SGD needs data: noise per step shrinks with N.
DEMO_SUBJECTS, DEMO_SLICES = 24, 20

console = Console(soft_wrap=True)
app = typer.Typer(help="MedGAN-FL: federated, privacy-preserving GANs for medical imaging.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
sites_app = typer.Typer(help="Site data: simulate multi-site phantom studies.", no_args_is_help=True)
app.add_typer(sites_app, name="sites")
privacy_app = typer.Typer(help="Differential privacy: what each site spent.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")
certs_app = typer.Typer(help="The study's certificate authority and the coordinator's TLS certificate.",
                        no_args_is_help=True)
app.add_typer(certs_app, name="certs")
site_app = typer.Typer(help="Hospital side of a real federation: keys and the site daemon.", no_args_is_help=True)
app.add_typer(site_app, name="site")
server_app = typer.Typer(help="Coordinator side of a real federation: SuperLink and site registration.",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")


def _fail(exc: MedGANError) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@sites_app.command("simulate")
def sites_simulate(
    out: Path = typer.Option(..., "--out", help="Folder to write the study into (one sub-folder per site)."),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of hospitals."),
    subjects: int = typer.Option(10, "--subjects", min=3, help="Subjects per site (split 70/10/20 into train/val/test)."),
    slices: int = typer.Option(16, "--slices", min=1, help="Axial slices per volume."),
    size: int = typer.Option(128, "--size", min=32, help="In-plane matrix size of the scanner images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantom model and the scanners' noise."),
    force: bool = typer.Option(False, "--force",
                               help="Replace the simulated sites of a study in --out (other folders stay)."),
) -> None:
    """Write a multi-site study: CT as DICOM series, MR as NIfTI, a manifest.csv per site."""
    try:
        _simulate(out, sites, subjects, slices, size, seed, force)
    except MedGANError as exc:
        _fail(exc)


def _simulate(out: Path, sites: int, subjects: int, slices: int, size: int, seed: int, force: bool) -> list[Path]:
    if (out / "study.json").exists():
        if not force:
            raise MedGANError(f"{out} already holds a study; pass --force to replace its simulated sites")
        kept = remove_simulated_study(out)  # only folders the simulator marked; user files stay
        for folder in kept:
            console.print(f"  [yellow]kept[/] {folder}: not written by the simulator")
    started = time.monotonic()
    with console.status("simulating sites…") as status:
        folders = simulate_study(out, n_sites=sites, n_subjects=subjects, n_slices=slices, size=size, seed=seed,
                                 progress=lambda text: status.update(f"simulating {text}"))
    for folder in folders:
        console.print(f"  [green]✓[/] {folder}  ({folder / 'manifest.csv'})")
    console.print(f"{len(folders)} site(s) written to {out} in {time.monotonic() - started:.1f} s")
    return folders


@app.command()
def demo(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="Study TOML ([run] and [task] tables)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Override run.rounds."),
    local_steps: Optional[int] = typer.Option(None, "--local-steps", min=1, help="Override task.local-steps."),
    sites_dir: Optional[Path] = typer.Option(None, "--sites-dir", help="Override run.sites-dir."),
    out: Optional[Path] = typer.Option(None, "--out", help="Override run.out-dir (the run folder)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (override run.device)."),
    privacy: Optional[bool] = typer.Option(None, "--privacy/--no-privacy", help="Override privacy.enabled."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder after its last complete round."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's own logs."),
) -> None:
    """Simulate the sites if needed, then run a federated study in Flower's simulation engine."""
    try:
        if resume is not None:
            study = _resumed(resume)
        else:
            study = _demo_config(config, rounds, local_steps, sites_dir, out, device)
        if privacy is not None:
            study = study.replace(privacy={"enabled": privacy})
        _run_demo(study, verbose)
    except MedGANError as exc:
        _fail(exc)


def _demo_config(config: Path, rounds: Optional[int], local_steps: Optional[int], sites_dir: Optional[Path],
                 out: Optional[Path], device: Optional[str]) -> StudyConfig:
    study = load_study(config)
    run_changes = {k: v for k, v in (("rounds", rounds), ("device", device),
                                     ("sites_dir", str(sites_dir) if sites_dir else None),
                                     ("out_dir", str(out) if out else None)) if v is not None}
    task_changes = {"local_steps": local_steps} if local_steps is not None else {}
    return study.replace(run=run_changes, task=task_changes)


def _resumed(run_dir: Path) -> StudyConfig:
    """The study of an earlier run folder, set to continue where it stopped."""
    study = load_study(run_dir / "config.toml")
    return study.replace(run={"out_dir": str(run_dir.resolve()), "resume": True})


def _run_demo(study: StudyConfig, verbose: bool) -> None:
    from server.simulation import simulate_federation  # Flower and Ray load only when needed
    from server.run_folder import RunFolder
    from server.study import RoundSummary

    sites_dir = Path(study.run.sites_dir)
    sites = find_sites(sites_dir) if sites_dir.exists() else []
    simulated_here = (sites_dir / "study.json").exists()
    if not sites and not simulated_here:
        console.print(f"No study in {sites_dir}: simulating one of {study.run.num_sites} sites.")
        sites = _simulate(sites_dir, study.run.num_sites, DEMO_SUBJECTS, DEMO_SLICES, 128, study.task.seed,
                          force=False)
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
                  f"{study.task.local_steps} local steps · run folder {run_dir}")
    from server import private_network

    console.print("Network: " + ("private namespace, loopback only (nothing outside can reach the simulation)"
                                 if private_network.inside() else
                                 "[yellow]shared with this machine: Ray listens on every interface; keep inbound "
                                 "connections firewalled[/]"))
    privacy = study.privacy
    if privacy.enabled:
        console.print(f"Privacy: DP-SGD at every site, budget ε = {privacy.target_epsilon:g} at δ = {privacy.delta:g}"
                      + (f"; central DP σ = {privacy.central_noise_multiplier:g}" if privacy.central_noise_multiplier else ""))
    else:
        console.print("[yellow]Privacy: differential privacy is OFF for this study.[/]")
    first_swd: dict[str, float] = {}

    def show(summary: RoundSummary) -> None:
        swd = summary.evaluate.get("swd")  # absent where sites keep held-out scores to themselves
        if swd is not None:
            first_swd.setdefault("swd", swd)
        parts = [f"Round {summary.server_round:>2}/{summary.rounds}", f"sites {summary.sites_ok}/{len(sites)}"]
        if "loss-d" in summary.train and "loss-g" in summary.train:  # sent only without DP
            parts.append(f"D {summary.train['loss-d']:.3f} · G {summary.train['loss-g']:.3f}")
        if swd is not None:
            parts.append(f"held-out SWD {swd:.4f} (round 0: {first_swd['swd']:.4f})")
        if "epsilon" in summary.train:
            parts.append(f"ε {summary.train['epsilon']:.2f}")
        parts.append(f"{summary.seconds:.1f} s")
        label = "initial model" if summary.server_round == 0 else ""
        console.print("  " + " · ".join(parts) + (f" [dim]{label}[/]" if label else ""))
        for excluded in summary.excluded:
            console.print(f"  [red]left out node {excluded['node']}:[/] {excluded['reason']}")

    started = time.monotonic()
    simulate_federation(study, sites, run_dir, progress=show, verbose=verbose)
    console.print(f"Done in {time.monotonic() - started:.0f} s.")
    console.print(f"  report:      {run_dir / 'report.md'}")
    console.print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    console.print(f"  checkpoints: {run_dir / 'checkpoints'}")
    console.print(f"  samples:     {run_dir / 'samples'}  (round-000.png = untrained, last = final model)")
    console.print(f"  privacy:     medgan privacy report {run_dir}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by 'medgan demo'.")) -> None:
    """Rewrite report.md of a run folder from its metrics.jsonl and config.toml."""
    from server.report import write_report
    from server.run_folder import RunFolder

    try:
        folder = RunFolder(run_dir)
        write_report(folder, load_study(folder.config))
        console.print(f"wrote {folder.report}")
    except MedGANError as exc:
        _fail(exc)


@privacy_app.command("report")
def privacy_report_command(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """ε per site per round, δ, noise, clipping and sampling rate; writes privacy-report.md."""
    from server.privacy_report import privacy_report
    from server.run_folder import RunFolder

    try:
        from rich.markdown import Markdown

        console.print(Markdown(privacy_report(RunFolder(run_dir))))
        console.print(f"written to {run_dir / 'privacy-report.md'}")
    except MedGANError as exc:
        _fail(exc)


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(Path("certs"), "--out", help="Folder for ca.crt, ca.key, server.pem, server.key."),
    san: list[str] = typer.Option(..., "--san", help="Host name or IP the sites connect to (repeat for several)."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of the certificates."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA."),
) -> None:
    """Create the study CA and the SuperLink's TLS certificate (private keys mode 0600)."""
    from medgan_core.credentials import init_certificates

    try:
        paths = init_certificates(out, list(san), days, force)
    except MedGANError as exc:
        _fail(exc)
    console.print(f"CA certificate (give to every site): {paths.ca_cert}")
    console.print(f"CA key (keep offline, 0600):          {paths.ca_key}")
    console.print(f"SuperLink certificate and key:        {paths.server_cert}, {paths.server_key}  (SANs: {', '.join(san)})")


@site_app.command("keys")
def site_keys(
    name: str = typer.Option(..., "--name", help="The site's name, e.g. hospital-a."),
    out: Path = typer.Option(Path("keys"), "--out", help="Folder for NAME (private, 0600) and NAME.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Create the site's node-authentication key pair; send only NAME.pub to the coordinator."""
    from medgan_core.credentials import site_key_pair

    try:
        private, public = site_key_pair(out, name, force)
    except MedGANError as exc:
        _fail(exc)
    console.print(f"private key (never leaves the site): {private}")
    console.print(f"public key (send to the coordinator): {public}")


@app.command("app-hash")
def app_hash_command() -> None:
    """The SHA-256 of the study app this checkout would run: what a site pins in site.toml ([site] app-hash)."""
    from client.supernode_guard import app_hash
    from medgan_core.runtime import APP_DIR

    try:
        console.print(app_hash(APP_DIR))
    except MedGANError as exc:
        _fail(exc)


@site_app.command("start")
def site_start(config: Path = typer.Option(..., "--config", help="The site's site.toml.")) -> None:
    """Check the site's data, certificate and key, then run its SuperNode (Ctrl+C stops it)."""
    from client.daemon import supernode_command
    from medgan_core.config import load_site

    try:
        site, connection = load_site(config)
        command, env = supernode_command(site, connection)
    except MedGANError as exc:
        _fail(exc)
    console.print(f"site {site.site_name}: data {site.data_path}, state {site.state_dir}")
    console.print(f"connecting to {connection.superlink} (TLS, CA {connection.ca_cert}, key {connection.private_key})")
    _exec(command, env)


@server_app.command("start")
def server_start(config: Path = typer.Option(..., "--config", help="The coordinator.toml.")) -> None:
    """Check the TLS files, then run the SuperLink with TLS, node authentication and a state database."""
    from medgan_core.config import load_coordinator
    from server.deploy import superlink_command

    try:
        coordinator = load_coordinator(config)
        command, env = superlink_command(coordinator)
    except MedGANError as exc:
        _fail(exc)
    console.print(f"SuperLink on {coordinator.address} (TLS, node authentication on, state {coordinator.database})")
    _exec(command, env)


@server_app.command("register")
def server_register(
    public_key: Path = typer.Argument(..., help="A site's NAME.pub."),
    config: Path = typer.Option(..., "--config", help="The coordinator.toml."),
) -> None:
    """Allow a site's key to join the federation (the SuperLink must be running)."""
    import subprocess

    from medgan_core.config import load_coordinator
    from server.deploy import register_command

    try:
        command, env = register_command(load_coordinator(config), public_key)
    except MedGANError as exc:
        _fail(exc)
    raise typer.Exit(code=subprocess.run(command, env=env, check=False).returncode)


@app.command()
def run(
    federation: Path = typer.Option(..., "--federation", help="The coordinator.toml of the running SuperLink."),
    config: Optional[Path] = typer.Option(None, "--config", help="Study TOML ([run], [task], [privacy])."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder after its last complete round."),
) -> None:
    """Submit a study to the federation and stream its progress (Flower's 'flwr run' underneath)."""
    from medgan_core.config import load_coordinator
    from server.deploy import submit_study

    try:
        if (config is None) == (resume is None):
            raise MedGANError("give either --config STUDY.toml (a new study) or --resume RUN_DIR")
        study = _resumed(resume) if resume is not None else load_study(config)  # type: ignore[arg-type]
        coordinator = load_coordinator(federation)
        # The run folder is written by the coordinator's ServerApp: make it absolute here.
        study = study.replace(run={"out_dir": str(Path(study.run.out_dir).resolve())})
        console.print(f"submitting {study.task.name} ({study.run.rounds} rounds, {study.run.num_sites} sites) "
                      f"to {coordinator.address}; run folder on the coordinator: {study.run.out_dir}")
        code = submit_study(coordinator, study)
        from server.run_folder import RunFolder

        folder = RunFolder(Path(study.run.out_dir))
        if code == 0 and folder.metrics.exists() and not folder.trained_rounds():
            raise MedGANError(f"the study ended without one usable round: no round updated the model (the sites' "
                              f"reasons are in {folder.metrics})")
    except MedGANError as exc:
        _fail(exc)
    raise typer.Exit(code=code)


def _exec(command: list[str], env: dict[str, str]) -> None:
    """Run a long-lived Flower process in the foreground; Ctrl+C stops it cleanly."""
    import subprocess

    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        code = process.wait(timeout=30)
    raise typer.Exit(code=code)


def main() -> None:
    """The ``medgan`` entry point: a MedGANError is one line (exit 2); anything unexpected
    is one line too (exit 1), with the traceback only when MEDGAN_DEBUG=1."""
    import os
    import sys

    from server import private_network

    if sys.argv[1:2] == ["demo"] and not private_network.inside() and private_network.available():
        # Ray (Flower's simulation engine) listens on every interface: run it where only loopback exists.
        sys.exit(private_network.run_inside(["-m", "server.cli", *sys.argv[1:]]))
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
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("MEDGAN_DEBUG") == "1":
            raise
        console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc} "
                      "(set MEDGAN_DEBUG=1 for the traceback, and please report it)")
        sys.exit(1)


__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
