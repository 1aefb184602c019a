from pathlib import Path

import pytest

from client.site import resolve_data_path, site_seed
from medgan_core.errors import ConfigError


def test_deployed_node_uses_its_data_path(tiny_sites: list[Path]) -> None:
    assert resolve_data_path({"data-path": str(tiny_sites[0])}, {}) == tiny_sites[0]
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data_path({"data-path": "/no/such/site"}, {})
    with pytest.raises(ConfigError, match="data-path"):
        resolve_data_path({}, {})


def test_simulated_node_maps_partition_to_site(tiny_sites: list[Path]) -> None:
    sites_dir = str(tiny_sites[0].parent)
    paths = [resolve_data_path({"partition-id": i}, {"run.sites-dir": sites_dir}) for i in range(2)]
    assert paths == sorted(tiny_sites)
    with pytest.raises(ConfigError, match="has no site"):
        resolve_data_path({"partition-id": 5}, {"run.sites-dir": sites_dir})


def test_site_seed_is_stable_and_differs_by_site_and_round() -> None:
    assert site_seed(0, 1, "/a/site-1") == site_seed(0, 1, "/elsewhere/site-1")  # a moved study trains the same
    assert len({site_seed(0, 1, "/x/a"), site_seed(0, 2, "/x/a"), site_seed(0, 1, "/x/b")}) == 3
