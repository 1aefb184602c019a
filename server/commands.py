"""The coordinator's commands: certificates, the SuperLink, site registration, studies, reports.

``medgan.cli`` mounts them; ``report`` and ``run`` are top-level commands there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medgan_core.study_config import StudyConfig, load_study
from medgan_core.console import console, fail, run_foreground
from medgan_core.errors import MedGANError
from medgan_core.run_layout import RunLayout

privacy_app = typer.Typer(help="Differential privacy: what each site spent.", no_args_is_help=True)
certs_app = typer.Typer(help="The study's certificate authority and the coordinator's TLS certificate.",
                        no_args_is_help=True)
server_app = typer.Typer(help="Coordinator side of a real federation: SuperLink and site registration.",
                         no_args_is_help=True)


def resumed_study(run_dir: Path) -> StudyConfig:
    """The study of an earlier run folder, set to continue where it stopped."""
    study = load_study(RunLayout(run_dir).config)
    return study.replace(run={"out_dir": str(run_dir.resolve()), "resume": True})


def report(run_dir: Path = typer.Argument(..., help="A run folder written by 'medgan demo'.")) -> None:
    """Rewrite report.md of a run folder from its metrics.jsonl and config.toml."""
    from server.report import write_report
    from server.run_folder import RunFolder

    try:
        folder = RunFolder(run_dir)
        study = load_study(folder.config)
        try:
            write_report(folder, study)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a line of another program or version
            raise MedGANError(f"{folder.metrics} has a line this report cannot read ({type(exc).__name__}: {exc}); "
                              "was it written by this version of MedGAN-FL?") from exc
        console.print(f"wrote {folder.report}")
    except MedGANError as exc:
        fail(exc)


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
        fail(exc)


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
        fail(exc)
    console.print(f"CA certificate (give to every site): {paths.ca_cert}")
    console.print(f"CA key (keep offline, 0600):          {paths.ca_key}")
    console.print(f"SuperLink certificate and key:        {paths.server_cert}, {paths.server_key}  (SANs: {', '.join(san)})")


@server_app.command("start")
def server_start(config: Path = typer.Option(..., "--config", help="The coordinator.toml.")) -> None:
    """Check the TLS files, then run the SuperLink with TLS, node authentication and a state database."""
    from medgan_core.config import load_coordinator
    from server.deploy import superlink_command

    try:
        coordinator = load_coordinator(config)
        command, env = superlink_command(coordinator)
    except MedGANError as exc:
        fail(exc)
    console.print(f"SuperLink on {coordinator.address} (TLS, node authentication on, state {coordinator.database})")
    run_foreground(command, env)


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
        fail(exc)
    raise typer.Exit(code=subprocess.run(command, env=env, check=False).returncode)


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
        study = resumed_study(resume) if resume is not None else load_study(config)  # type: ignore[arg-type]
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
        fail(exc)
    raise typer.Exit(code=code)


def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder (or a copy of one)."),
    out: Path = typer.Option(..., "--out", help="The model file to write, e.g. denoise.medgan."),
    server_round: int = typer.Option(None, "--round", help="The round to export (default: the last trained one)."),
    site_state: Path = typer.Option(None, "--site-state", help="At a site: its state folder, for its own local layers."),
    for_new_site: bool = typer.Option(False, "--for-new-site", help="Site-kept layers at their initial values."),
) -> None:
    """Write the study's model with everything needed to apply it, and where it came from."""
    from server.export import export_model

    try:
        path = export_model(run_dir, out, server_round=server_round, site_state=site_state, for_new_site=for_new_site)
    except MedGANError as exc:
        fail(exc)
    from medgan_core.model_file import load_model
    from medgan_core.tasks.registry import task_class
    from medgan_core.tasks.synthesis import SynthesisTask

    generator = issubclass(task_class(load_model(path).task.name), SynthesisTask)  # what 'medgan synth' draws from
    use = (f"medgan synth --model {path} --n … --out …" if generator
           else f"medgan infer --model {path} --input … --output …")
    console.print(f"model written to {path}; apply it with '{use}'")
