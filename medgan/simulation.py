"""Run a study on one machine with Flower's simulation engine (one virtual node per site).

It assembles both sides, the hospitals' ClientApp and the coordinator's ServerApp, so it
belongs to neither: the command layer (``medgan``) owns it."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
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
from client.site import simulated_site  # noqa: E402
from medgan_core.config import SiteConfig  # noqa: E402
from medgan_core.study_config import StudyConfig  # noqa: E402
from medgan_core.errors import ConfigError  # noqa: E402
from medgan_core.run_layout import RunLayout  # noqa: E402
from medgan_core.runtime import resolve_device  # noqa: E402
from server.app import build_server_app  # noqa: E402
from server.warm_start import initial_weights  # noqa: E402
from client.secagg import build_secagg_client_app  # noqa: E402
from server.secagg import build_secagg_server_app  # noqa: E402
from server.study import RoundSummary, SiteWatcher  # noqa: E402
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
    ray_address: str | None = None,
    watch: SiteWatcher | None = None,
) -> Path:
    """Train ``study`` across ``site_paths`` (one simulated hospital each); returns the run folder.

    A site given as a path keeps its privacy state under ``RUN_DIR/site-state/<site>``. With
    ``ray_address`` (``HOST:PORT`` of a running Ray head) the sites run on that cluster instead of
    a Ray started here; each node must hold this checkout at the same path and see the sites'
    folders (README: "A study on a Ray cluster").
    """
    if len(site_paths) != study.run.num_sites:
        raise ConfigError(f"run.num-sites = {study.run.num_sites} but {len(site_paths)} site folder(s) were given")
    sites = [_site(p, Path(run_dir)) for p in site_paths]
    for site in sites:
        if not Path(site.data_path).exists():
            raise ConfigError(f"site folder {site.data_path} does not exist; run 'medgan sites simulate' first")
    if not study.run.resume:
        initial_weights(study)  # a bad starting model (run.initial-model) fails here, before Ray starts
    keep_ray_on_loopback()  # again: something else may have imported Ray since
    if ray_address is None:
        use_gpu = resolve_device(study.run.device).type == "cuda"
        cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count() if use_gpu else 0
        init_args = {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False, "log_to_driver": verbose}
    else:  # joined here, so that the sites' shares come from the cluster's size; Flower then finds Ray running
        cpus, gpus = join_ray_cluster(ray_address, verbose)
        use_gpu, init_args = gpus > 0 and study.run.device != "cpu", {}
    backend_config = {
        "client_resources": {"num_cpus": cpu_share(cpus, len(sites)),
                             "num_gpus": min(1.0, gpus / len(sites)) if use_gpu else 0.0},
        "init_args": init_args,
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
                                          failures=failures, watch=watch)
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
        if ray_address is not None:  # leave the cluster (Flower disconnects too, unless it failed first)
            import ray

            ray.shutdown()
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


#: Seconds to wait for a Ray head's port: Ray itself retries an absent head for minutes.
RAY_CONNECT_TIMEOUT_S = 10.0


def join_ray_cluster(address: str, verbose: bool = False) -> tuple[int, int]:
    """Connect this process to the Ray cluster whose head is at ``HOST:PORT``; its (CPUs, GPUs).

    The workers import this checkout through PYTHONPATH, as Flower's own Ray start arranges."""
    import ray

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT of the Ray head (ray start --head --port)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"no Ray head answers at {address} ({exc.strerror or exc}); start one with "
                          f"'ray start --head --port {port}' or check the address") from None
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        ray.init(address=address, log_to_driver=verbose, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cpus < 1:
        ray.shutdown()
        raise ConfigError(f"the Ray cluster at {address} offers no CPU to run sites on")
    return cpus, gpus


def _site(site: str | Path | SiteConfig, run_dir: Path) -> SiteConfig:
    if isinstance(site, SiteConfig):
        return site
    path = Path(site).resolve()
    return simulated_site(path, RunLayout(run_dir).site_state(path.name).resolve())
