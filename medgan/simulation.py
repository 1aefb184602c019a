"""Run a study on one machine with Flower's simulation engine (one virtual node per site).

It assembles both sides, the hospitals' ClientApp and the coordinator's ServerApp, so it
belongs to neither: the command layer (``medgan``) owns it."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals and CI are offline
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from client.ray_guard import keep_ray_on_loopback  # noqa: E402

keep_ray_on_loopback()  # before Flower imports Ray, which reads the setting once

import torch  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from client.app import build_client_app  # noqa: E402
from medgan_core.config import SiteConfig  # noqa: E402
from medgan_core.study_config import StudyConfig  # noqa: E402
from medgan_core.errors import ConfigError  # noqa: E402
from medgan_core.run_layout import RunLayout  # noqa: E402
from medgan_core.runtime import resolve_device  # noqa: E402
from server.app import build_server_app  # noqa: E402
from client.secagg import build_secagg_client_app  # noqa: E402
from server.secagg import build_secagg_server_app  # noqa: E402
from server.study import RoundSummary  # noqa: E402
from flwr.app import Message  # noqa: E402
from flwr.clientapp.typing import Mod  # noqa: E402


def simulate_federation(
    study: StudyConfig,
    site_paths: Sequence[str | Path | SiteConfig],
    run_dir: str | Path,
    *,
    progress: Callable[[RoundSummary], None] | None = None,
    on_train_replies: Callable[[int, list[Message]], None] | None = None,
    client_mods: Sequence[Mod] = (),
    verbose: bool = False,
) -> Path:
    """Train ``study`` across ``site_paths`` (one simulated hospital each); returns the run folder.

    A site given as a path keeps its privacy state under ``RUN_DIR/site-state/<site>``.
    """
    if len(site_paths) != study.run.num_sites:
        raise ConfigError(f"run.num-sites = {study.run.num_sites} but {len(site_paths)} site folder(s) were given")
    sites = [_site(p, Path(run_dir)) for p in site_paths]
    for site in sites:
        if not Path(site.data_path).exists():
            raise ConfigError(f"site folder {site.data_path} does not exist; run 'medgan sites simulate' first")
    keep_ray_on_loopback()  # again: something else may have imported Ray since
    use_gpu = resolve_device(study.run.device).type == "cuda"
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": cpu_share(cpus, len(sites)), "num_gpus": (1.0 / len(site_paths)) if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": torch.cuda.device_count() if use_gpu else 0,
                      "include_dashboard": False, "log_to_driver": verbose},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    failures: list[BaseException] = []
    try:
        if study.privacy.secagg:
            server_app = build_secagg_server_app(study, run_dir, progress)
            client_app = build_secagg_client_app(sites)
        else:
            server_app = build_server_app(study, run_dir, progress=progress, on_train_replies=on_train_replies,
                                          failures=failures)
            client_app = build_client_app(sites, client_mods)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(sites),
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(level)
    if failures:  # the study itself failed: say so (one line at the CLI), do not return as if done
        raise failures[0]
    return Path(run_dir)


def cpu_share(cpus: int, n_sites: int) -> float:
    """Ray CPUs per simulated site: one each while they fit, else an equal share so every site
    trains at once. With 3 sites on 2 cores and one CPU each, the third site trained alone after
    the other two, leaving a core idle for a third of every round. At most two sites per core
    (each is a process holding its data and models); rounded down to Ray's 1e-4 resource grain,
    so the shares never add up to more than the cores."""
    if n_sites <= cpus:
        return 1.0
    return max(0.5, math.floor(cpus / n_sites * 10_000) / 10_000)


def _site(site: str | Path | SiteConfig, run_dir: Path) -> SiteConfig:
    if isinstance(site, SiteConfig):
        return site
    path = Path(site).resolve()
    return SiteConfig(str(path), state_dir=str(RunLayout(run_dir).site_state(path.name).resolve()))
