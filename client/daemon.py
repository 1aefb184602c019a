"""The hospital's site daemon: a Flower SuperNode started from the site's own config.

Everything that can be checked before dialling the coordinator is: the data folder and
its manifest, the study CA certificate, the site's private key (and its permissions),
the state folder for the privacy accountant.
"""

from __future__ import annotations

import sys
from pathlib import Path

from client.supernode_guard import app_hash, check_hashes
from medgan_core.config import ConnectionConfig, SiteConfig
from medgan_core.credentials import check_certificate, check_private_key
from medgan_core.data.manifest import read_manifest
from medgan_core.errors import ConfigError, MedGANError
from medgan_core.runtime import APP_DIR, offline_env


def check_site(site: SiteConfig, connection: ConnectionConfig) -> None:
    """Everything a SuperNode needs, checked before it dials the coordinator."""
    data = Path(site.data_path)
    if not data.is_dir():
        raise ConfigError(f"site data-path {data} does not exist")
    read_manifest(data)  # missing, unreadable or inconsistent manifests fail here, by line
    check_certificate(connection.ca_cert, "CA certificate")
    check_private_key(connection.private_key, "site private key")
    if not site.state_dir:
        raise ConfigError("[site] state-dir is empty; the privacy accountant must live somewhere that survives restarts")
    try:
        Path(site.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"site state-dir {site.state_dir} cannot be created ({exc})") from exc


def node_config(site: SiteConfig) -> str:
    """The SuperNode's --node-config string: what the ClientApp reads in ``context.node_config``."""
    items = {"data-path": site.data_path, "state-dir": site.state_dir, "device": site.device, "site-name": site.name}
    text = " ".join(f'{key}="{value}"' for key, value in items.items())
    if site.epsilon_budget > 0:
        text += f" epsilon-budget={site.epsilon_budget}"
    if site.physical_batch > 0:
        text += f" physical-batch={site.physical_batch}"
    if site.precision:
        text += f' precision="{site.precision}"'
    text += (f" require-dp={str(site.require_dp).lower()} require-secure-rng={str(site.require_secure_rng).lower()}"
             f" max-delta={site.max_delta!r} require-patient-level={str(site.require_patient_level).lower()}"
             f" release-test-metrics={str(site.release_test_metrics).lower()}"
             f" max-steps-per-round={site.max_steps_per_round} max-batch-size={site.max_batch_size}")
    return text


def supernode_command(
    site: SiteConfig, connection: ConnectionConfig, check: bool = True
) -> tuple[list[str], dict[str, str]]:
    """Flower's SuperNode, behind ``client.supernode_guard`` (only approved app hashes run),
    with the site's CA, key and node config (its policy included); its Flower home
    (installed apps) lives in the site's state folder."""
    if check:
        check_site(site, connection)
    for value in (site.data_path, site.state_dir, site.name):
        if '"' in value:
            raise MedGANError(f"{value!r}: paths and names may not contain double quotes")
    approved = check_hashes(site.app_hash.split(",")) if site.app_hash.strip() else (app_hash(APP_DIR),)
    return [
        sys.executable, "-m", "client.supernode_guard",  # runs only study apps this site approved
        "--app-hash", ",".join(approved), "--",
        "--superlink", connection.superlink,
        "--root-certificates", connection.ca_cert,
        "--auth-supernode-private-key", connection.private_key,
        "--node-config", node_config(site),
        "--port", str(connection.port),
    ], offline_env({"FLWR_HOME": str(Path(site.state_dir) / "flower-home")})
