"""Where a site's data lives and how it is loaded, from the node's Flower context."""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from medgan_core.config import TaskConfig
from medgan_core.data.dataset import SiteData, load_site_data
from medgan_core.data.simulate import find_sites
from medgan_core.errors import ConfigError


def resolve_data_path(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> Path:
    """A deployed SuperNode names its data with ``data-path``; a simulated node is
    mapped by ``partition-id`` onto the sites of ``run.sites-dir``."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
    elif "partition-id" in node_config:
        sites_dir = str(run_config.get("run.sites-dir", "sites_example/data"))
        sites = find_sites(sites_dir)
        index = int(node_config["partition-id"])  # type: ignore[arg-type]
        if index >= len(sites):
            raise ConfigError(f"simulated node {index} has no site: {sites_dir} holds {len(sites)} site(s)")
        path = sites[index]
    else:
        raise ConfigError("node config has no 'data-path'; start the site with --node-config 'data-path=\"...\"'")
    if not path.exists():
        raise ConfigError(f"site data path {path} does not exist")
    return path


@lru_cache(maxsize=4)
def cached_site_data(data_path: str, task: TaskConfig) -> SiteData:
    """Decode a site's images once per process, not every round (read-only cache)."""
    return load_site_data(data_path, task)


def site_seed(base_seed: int, server_round: int, data_path: str | Path) -> int:
    """A per-site, per-round seed, stable across processes, restarts and machines.

    It depends on the site folder's name, not its absolute path, so a copy of a study
    elsewhere trains identically.
    """
    name = Path(data_path).name
    return (base_seed * 1_000_003 + server_round * 7919 + zlib.crc32(name.encode())) % 2**31
