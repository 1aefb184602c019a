"""The hospital's commands: ``medgan site index|check|keys|cache|start``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from medgan_core.console import console, fail, run_foreground
from medgan_core.errors import MedGANError

site_app = typer.Typer(help="Hospital side of a real federation: data, keys and the site daemon.",
                       no_args_is_help=True)


@site_app.command("index")
def site_index(
    export: Path = typer.Argument(..., help="A PACS export: nested folders, DICOMDIR, mixed series, NIfTI."),
    out: Path = typer.Option(..., "--out", help="The manifest to write, in EXPORT or a folder above it."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subjects' train/val/test split."),
    nifti_modality: str = typer.Option("MR", "--nifti-modality", help="Modality of NIfTI files (no header says)."),
    pseudonymise: bool = typer.Option(False, "--pseudonymise", help="Subjects as keyed hashes of the PatientID."),
    force: bool = typer.Option(False, "--force", help="Replace an existing manifest."),
) -> None:
    """Write a draft manifest of every usable CT/MR series for you to review; the export is only read."""
    from rich.table import Table

    from client.site_index import index_export, write_index

    try:
        result = index_export(export, out, seed=seed, nifti_modality=nifti_modality, pseudonymise=pseudonymise)
        path = write_index(result, out, force)
    except MedGANError as exc:
        fail(exc)
    table = Table("file", "subject", "modality", "split", "domain")
    for e in result.entries:
        table.add_row(e.file, e.subject, e.modality, e.split, e.domain)
    console.print(table)
    for what, why in result.skipped:
        console.print(f"left out: {what}: {why}")
    console.print(f"{len(result.entries)} series written to {path}; {len(result.skipped)} left out. Review it, "
                  "then run 'medgan site check'.")


@site_app.command("check")
def site_check(
    data: Path = typer.Argument(None, help="The site folder (holding manifest.csv); or use --config."),
    config: Path = typer.Option(None, "--config", help="The site's site.toml (its data-path is checked)."),
    task: str = typer.Option("", "--task", help="Also assemble this task's data (pairs, labels)."),
) -> None:
    """Decode every image the site lists and print a table per series; exit 1 on any problem."""
    code = check_and_report(_data_path(data, config), task)
    if code:
        raise typer.Exit(code)


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
        fail(exc)
    console.print(f"private key (never leaves the site): {private}")
    console.print(f"public key (send to the coordinator): {public}")


@site_app.command("cache")
def site_cache(
    config: Path = typer.Option(None, "--config", help="The site's site.toml (its state-dir holds the cache)."),
    state_dir: Path = typer.Option(None, "--state-dir", help="A site's state folder (simulation: RUN_DIR/site-state/SITE)."),
    prune_older_than: float = typer.Option(None, "--prune-older-than", metavar="DAYS",
                                           help="Delete the entries no study has opened for DAYS days."),
) -> None:
    """List the site's decoded-data cache (entries, size, last use); optionally prune old entries."""
    from datetime import datetime

    from rich.table import Table

    from client.site import DATA_CACHE
    from medgan_core.config import load_site
    from medgan_core.data.cache_admin import cache_entries, prune_cache

    if (config is None) == (state_dir is None):
        fail(MedGANError("name the site's --config site.toml or its --state-dir (one of them)"))
    if config is not None:
        try:
            state_dir = Path(load_site(config)[0].state_dir)
        except MedGANError as exc:
            fail(exc)
    if not state_dir.is_dir():  # type: ignore[union-attr]
        fail(MedGANError(f"state-dir {state_dir} does not exist"))
    cache = state_dir / DATA_CACHE  # type: ignore[operator]
    try:
        removed = prune_cache(cache, prune_older_than) if prune_older_than is not None else []
    except MedGANError as exc:
        fail(exc)
    entries = cache_entries(cache)
    table = Table("entry", "files", "size (MB)", "last used")
    for e in entries:
        table.add_row(e.name + (" (unfinished build)" if e.unfinished else ""), str(len(e.paths)),
                      f"{e.size / 1e6:.1f}", datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M"))
    if entries:
        console.print(table)
    if prune_older_than is not None:
        console.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} not used for "
                      f"{prune_older_than:g} days ({sum(e.size for e in removed) / 1e6:.1f} MB freed)")
    console.print(f"{cache}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
                  f"{sum(e.size for e in entries) / 1e6:.1f} MB")


def _data_path(data: Path | None, config: Path | None) -> Path:
    from medgan_core.config import load_site

    if (data is None) == (config is None):
        fail(MedGANError("name the site folder or --config site.toml (one of them)"))
    if config is not None:
        try:
            return Path(load_site(config)[0].data_path)
        except MedGANError as exc:
            fail(exc)
    return data  # type: ignore[return-value]


def check_and_report(data: Path, task: str = "") -> int:
    """Run the site check with progress, print its table and problems; 0 when all is well."""
    from rich.table import Table

    from client.site_check import check_site_data

    with console.status("decoding every image…") as status:
        reports, problems = check_site_data(
            data, task, progress=lambda done, total: status.update(f"decoding every image… {done}/{total} series"))
    if reports:
        table = Table("file", "modality", "split", "slices", "size", "spacing (mm)", "values", "problem")
        for r in reports:
            table.add_row(r.file, r.modality, r.split, str(r.slices or ""), r.size, r.spacing, r.value_range,
                          r.problem)
        console.print(table)
    for problem in problems:
        console.print(f"[red]problem:[/] {escape(str(problem))}", markup=True)
    if problems:
        console.print(f"{len(problems)} problem(s) in {data}; fix them before this site joins a study")
        return 1
    console.print(f"{len(reports)} series in {data} read without problems")
    return 0


@site_app.command("start")
def site_start(config: Path = typer.Option(..., "--config", help="The site's site.toml.")) -> None:
    """Check the site's data, certificate and key, then run its SuperNode (Ctrl+C stops it)."""
    from client.daemon import supernode_command
    from medgan_core.config import load_site

    try:
        site, connection = load_site(config)
        command, env = supernode_command(site, connection)
    except MedGANError as exc:
        fail(exc)
    if check_and_report(Path(site.data_path)):  # a bad file stops the site here, before any round
        raise typer.Exit(1)
    console.print(f"site {site.site_name}: data {site.data_path}, state {site.state_dir}")
    console.print(f"connecting to {connection.superlink} (TLS, CA {connection.ca_cert}, key {connection.private_key})")
    run_foreground(command, env)


def infer_command(
    model: Path = typer.Option(..., "--model", help="A model file from 'medgan export'."),
    source: Path = typer.Option(..., "--input", help="A NIfTI file, a DICOM series folder or file, or a folder of studies."),
    output: Path = typer.Option(..., "--output", help="Folder for the outputs (NIfTI in, NIfTI out; DICOM in, DICOM out)."),
    device: str = typer.Option("auto", "--device", help="auto (GPU if present), cpu or cuda."),
) -> None:
    """Apply a denoise, superres, translate or cycle model to scans, written in their own format."""
    from client.infer import infer
    from medgan_core.model_file import load_model
    from medgan_core.runtime import resolve_device

    try:
        loaded = load_model(model)
        with console.status("applying the model…") as status:
            summary = infer(loaded, source, output, device=resolve_device(device),
                            progress=lambda name, done, total: status.update(f"{done}/{total}: {name}"))
    except MedGANError as exc:
        fail(exc)
    for path in summary.written:
        console.print(f"written: {path}")
    for path in summary.skipped:
        console.print(f"already there, skipped: {path}")
    for name, reason in summary.failed:
        console.print(f"[red]failed:[/] {escape(str(name))}: {escape(str(reason))}", markup=True)
    console.print(f"{len(summary.written)} written, {len(summary.skipped)} skipped, {len(summary.failed)} failed")
    if summary.failed:
        raise typer.Exit(1)


def synth_command(
    model: Path = typer.Option(..., "--model", help="A synthesis or conditional model file from 'medgan export'."),
    n: int = typer.Option(..., "--n", help="How many images."),
    out: Path = typer.Option(..., "--out", help="A new folder for the images, their manifest and provenance."),
    fmt: str = typer.Option("png", "--format", help="png, nifti or dicom."),
    label: int = typer.Option(None, "--label", help="Lesion-burden grade 0-3 (a grade-conditioned model)."),
    severity: float = typer.Option(None, "--severity", help="Severity 0-1 (a severity-conditioned model)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the latent codes."),
    device: str = typer.Option("auto", "--device", help="auto (GPU if present), cpu or cuda."),
) -> None:
    """Draw synthetic images, each marked synthetic, with a manifest naming the model, round and ε."""
    from client.synth import synthesise
    from medgan_core.model_file import load_model
    from medgan_core.runtime import resolve_device

    try:
        entries = synthesise(load_model(model), n, out, fmt=fmt, label=label, severity=severity, seed=seed,
                             device=resolve_device(device))
    except MedGANError as exc:
        fail(exc)
    console.print(f"{len(entries)} synthetic image(s) in {out} (manifest.csv, provenance.json)")


def adapt_command(
    model: Path = typer.Option(..., "--model", help="A model file from 'medgan export --for-new-site'."),
    data: Path = typer.Option(..., "--data", help="This hospital's site folder (manifest.csv, as 'medgan site index' writes)."),
    out: Path = typer.Option(..., "--out", help="The adapted model file to write."),
    steps: int = typer.Option(200, "--steps", min=1, help="Training steps on this site's images."),
    all_layers: bool = typer.Option(False, "--all-layers", help="Fine-tune every layer, not only the site-kept ones."),
    validate_every: int = typer.Option(100, "--validate-every", min=0,
                                       help="Keep the best model on this site's validation subjects, scored every "
                                            "this many steps (0, or no validation subjects: the last)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batches."),
    device: str = typer.Option("auto", "--device", help="auto (GPU if present), cpu or cuda."),
) -> None:
    """Fit the layers a study kept at its sites to this hospital's own images; nothing leaves it."""
    from client.adapt import adapt_model
    from medgan_core.model_file import load_model
    from medgan_core.runtime import resolve_device

    if out.exists():
        fail(MedGANError(f"{out} exists; name a new file for the adapted model"))
    try:
        with console.status(f"adapting for {steps} steps…"):
            result = adapt_model(load_model(model), data, out, steps=steps, seed=seed, all_layers=all_layers,
                                 device=resolve_device(device), validate_every=validate_every)
    except MedGANError as exc:
        fail(exc)
    shown = ", ".join(f"{k} {result.before[k]:.4g} -> {result.after[k]:.4g}" for k in result.after
                      if k in result.before and not k.endswith("-input"))
    console.print(f"held-out at this site: {shown}")
    kept = "" if result.kept_steps == steps else f", kept after {result.kept_steps} of {steps} steps (validation)"
    console.print(f"adapted model ({result.layers} arrays trained{kept}): {result.path}")
