"""The hospital's commands: ``medgan site keys`` and ``medgan site start``."""

from __future__ import annotations

from pathlib import Path

import typer

from medgan_core.console import console, fail, run_foreground
from medgan_core.errors import MedGANError

site_app = typer.Typer(help="Hospital side of a real federation: keys and the site daemon.", no_args_is_help=True)


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
    console.print(f"site {site.site_name}: data {site.data_path}, state {site.state_dir}")
    console.print(f"connecting to {connection.superlink} (TLS, CA {connection.ca_cert}, key {connection.private_key})")
    run_foreground(command, env)
