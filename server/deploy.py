"""A real federation: the coordinator's SuperLink, site registration, study submission.

Flower does the networking (SuperLink/SuperNode over HTTPS with TLS and node
authentication); this module turns MedGAN-FL configs into the exact Flower commands and
checks everything that can be checked *before* connecting: missing certificates, keys
that are not keys, a study config that would fail, a site folder without a manifest.
Every check raises a MedGANError naming the file and what to do.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from medgan_core.config import CoordinatorConfig
from medgan_core.study_config import StudyConfig
from medgan_core.credentials import check_certificate, check_private_key, check_public_key
from medgan_core.runtime import APP_DIR, flower_tool, offline_env

FEDERATION = "study"  # the name of the SuperLink connection in our FLWR_HOME config


# --- coordinator -----------------------------------------------------------------------
@dataclass(frozen=True)
class CoordinatorFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    database: Path


def coordinator_files(config: CoordinatorConfig) -> CoordinatorFiles:
    certs = Path(config.certs_dir)
    return CoordinatorFiles(
        check_certificate(certs / "ca.crt", "CA certificate"),
        check_certificate(certs / "server.pem", "server certificate"),
        check_private_key(certs / "server.key", "server key"),
        Path(config.database),
    )


def superlink_command(config: CoordinatorConfig) -> tuple[list[str], dict[str, str]]:
    """Flower's SuperLink, behind ``server.superlink_guard`` (Control and Runtime APIs for the
    coordinator host only), with TLS, node authentication, a state database and no runtime
    installs; its Flower home (installed apps) lives beside the database, not in the user's home."""
    files = coordinator_files(config)
    files.database.parent.mkdir(parents=True, exist_ok=True)
    env = offline_env({"FLWR_HOME": str(files.database.parent / "superlink-home")})
    return [
        sys.executable, "-m", "server.superlink_guard",  # Flower's SuperLink, Control API for this host only
        "--control-from", ",".join(config.control_addresses), "--",
        "--ssl-ca-certfile", str(files.ca_cert),
        "--ssl-certfile", str(files.server_cert),
        "--ssl-keyfile", str(files.server_key),
        "--enable-supernode-auth",
        "--database", str(files.database),
        "--disable-runtime-dependency-installation",
        "--host", config.host,
        "--port", str(config.port),
    ], env


def flwr_home(config: CoordinatorConfig) -> Path:
    """An FLWR_HOME whose connection ``study`` points at this SuperLink over TLS."""
    home = Path(config.database).parent / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    connection = {"address": config.local_address, "root-certificates": str(Path(config.certs_dir) / "ca.crt")}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": FEDERATION, FEDERATION: connection}}))
    return home


def register_command(config: CoordinatorConfig, public_key: str | Path) -> tuple[list[str], dict[str, str]]:
    key = check_public_key(public_key)
    coordinator_files(config)
    env = offline_env({"FLWR_HOME": str(flwr_home(config))})
    return [flower_tool("flwr"), "supernode", "register", str(key), FEDERATION], env


def run_command(config: CoordinatorConfig, study: StudyConfig, workdir: str | Path) -> tuple[list[str], dict[str, str]]:
    """flwr run of this app on the federation, with the study's settings as the run config."""
    coordinator_files(config)
    overrides = Path(workdir) / "run-config.toml"
    overrides.write_text(tomli_w.dumps(study.to_run_config()))
    env = offline_env({"FLWR_HOME": str(flwr_home(config))})
    return [flower_tool("flwr"), "run", str(APP_DIR), FEDERATION, "--stream", "--run-config", str(overrides)], env


def submit_study(config: CoordinatorConfig, study: StudyConfig, timeout: float | None = None) -> int:
    """Submit ``study`` and stream its logs until it ends; returns flwr's exit code."""
    with tempfile.TemporaryDirectory() as workdir:
        command, env = run_command(config, study, workdir)
        return subprocess.run(command, env=env, timeout=timeout, check=False).returncode
