"""Which site this node is and how its data is loaded, from the node's Flower context."""

from __future__ import annotations

import dataclasses
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from medgan_core.config import HOSPITAL_POLICY, SiteConfig, TaskConfig
from medgan_core.site_label import is_site_name
from medgan_core.data.dataset import SiteData
from medgan_core.tasks.registry import load_task_data, load_task_validation
from medgan_core.data.simulate import find_sites
from medgan_core.errors import ConfigError
from medgan_core.run_layout import RunLayout


def site_from_context(
    node_config: Mapping[str, object], run_config: Mapping[str, object], sites: Sequence[SiteConfig] | None = None
) -> SiteConfig:
    """A deployed SuperNode describes its site in its node config (``data-path``,
    ``state-dir``, ``device``, ``epsilon-budget``, ``physical-batch``, ``precision``, ``site-name``); a simulated node is
    mapped by ``partition-id`` onto ``sites`` or onto the site folders of ``run.sites-dir``."""
    if "data-path" in node_config:  # a deployed hospital: its policy defaults to HOSPITAL_POLICY
        policy = {**HOSPITAL_POLICY, **{k: v for k, v in node_config.items() if k in HOSPITAL_POLICY}}
        site = SiteConfig(
            data_path=str(node_config["data-path"]),
            name=str(node_config.get("site-name", "")),
            state_dir=str(node_config.get("state-dir", "")),
            device=str(node_config.get("device", "auto")),
            epsilon_budget=_number(node_config.get("epsilon-budget", 0.0), "epsilon-budget"),
            physical_batch=_whole(node_config.get("physical-batch", 0), "physical-batch"),
            precision=str(node_config.get("precision", "")),
            require_dp=_flag(policy["require-dp"], "require-dp"),
            require_secure_rng=_flag(policy["require-secure-rng"], "require-secure-rng"),
            max_delta=_number(policy["max-delta"], "max-delta"),
            require_patient_level=_flag(policy["require-patient-level"], "require-patient-level"),
            release_test_metrics=_flag(policy["release-test-metrics"], "release-test-metrics"),
            max_steps_per_round=_whole(policy["max-steps-per-round"], "max-steps-per-round"),
            max_batch_size=_whole(policy["max-batch-size"], "max-batch-size"),
        )
    elif "partition-id" in node_config:
        index = int(node_config["partition-id"])  # type: ignore[arg-type]
        if sites is None:
            sites_dir = str(run_config.get("run.sites-dir", "sites_example/data"))
            folders = find_sites(sites_dir)
            if index >= len(folders):
                raise ConfigError(f"simulated node {index} has no site: {sites_dir} holds {len(folders)} site(s)")
            run = RunLayout(Path(str(run_config.get("run.out-dir", "runs/flwr"))))
            sites = [simulated_site(f, run.site_state(f.name)) for f in folders]
        if index >= len(sites):
            raise ConfigError(f"simulated node {index} has no site: only {len(sites)} site(s) are configured")
        site = sites[index]
    else:
        raise ConfigError("node config has no 'data-path'; start the site with --node-config 'data-path=\"...\"'")
    site.validate()
    if not Path(site.data_path).exists():
        raise ConfigError(f"site data path {site.data_path} does not exist")
    return site


def simulated_site(folder: Path, state_dir: Path) -> SiteConfig:
    """A simulated site: named by its folder (when that name may travel: ``is_site_name``)."""
    return SiteConfig(str(folder), name=folder.name if is_site_name(folder.name) else "", state_dir=str(state_dir))


def _flag(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"node config {key} = {value!r}; use true or false")


def _whole(value: object, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ConfigError(f"node config {key} = {value!r}; use a whole number")


def site_task(task: TaskConfig, site: SiteConfig) -> TaskConfig:
    """The study's task as this site runs it: with the site's own ``physical-batch`` (what fits
    its memory) and ``precision`` (what its hardware computes fast) when it sets them; the
    update's meaning, the privacy mechanism and ε are the same."""
    if site.physical_batch > 0:
        task = dataclasses.replace(task, physical_batch=site.physical_batch)
    return dataclasses.replace(task, precision=site.precision) if site.precision else task


def _number(value: object, key: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key} = {value!r}; use a number") from None


#: The folder under a site's state folder that holds its preprocessed slices (private to the site).
DATA_CACHE = "data-cache"


@lru_cache(maxsize=4)
def cached_site_data(data_path: str, task: TaskConfig, state_dir: str = "") -> SiteData:
    """Decode a site's images once per process, not every round (read-only cache); slices at
    clinical geometry are also kept memory-mapped under ``state_dir`` (decoded once per study
    and setting, even across restarts)."""
    return load_task_data(data_path, task, Path(state_dir) / DATA_CACHE if state_dir else None)


def site_validation_data(data_path: str, task: TaskConfig, state_dir: str = "") -> SiteData | None:
    """The site's validation subjects (None: it has none), read when its personal fine-tune
    chooses its model by them; cached beside the other splits at clinical geometry."""
    return load_task_validation(data_path, task, Path(state_dir) / DATA_CACHE if state_dir else None)


def site_seed(base_seed: int, server_round: int, data_path: str | Path) -> int:
    """A per-site, per-round seed, stable across processes, restarts and machines.

    It depends on the site folder's name, not its absolute path, so a copy of a study
    elsewhere trains identically.
    """
    name = Path(data_path).name
    return (base_seed * 1_000_003 + server_round * 7919 + zlib.crc32(name.encode())) % 2**31
