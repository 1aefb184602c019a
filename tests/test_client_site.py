import dataclasses
from pathlib import Path

import pytest

from client.site import site_from_context, site_seed, site_task
from medgan_core.config import SiteConfig
from medgan_core.errors import ConfigError
from medgan_core.tasks.registry import task_config


def test_deployed_node_describes_its_site_in_node_config(tiny_sites: list[Path]) -> None:
    node = {"data-path": str(tiny_sites[0]), "state-dir": "/var/medgan", "epsilon-budget": 3.0, "site-name": "st-mary"}
    site = site_from_context(node, {})
    # a deployed node that names no policy gets the hospital's strict one
    assert site == SiteConfig(str(tiny_sites[0]), name="st-mary", state_dir="/var/medgan", epsilon_budget=3.0,
                              require_dp=True, require_secure_rng=True, max_delta=1e-5, require_patient_level=True,
                              release_test_metrics=False, max_steps_per_round=10_000, max_batch_size=512)
    assert site.site_name == "st-mary"
    with pytest.raises(ConfigError, match="does not exist"):
        site_from_context({"data-path": "/no/such/site"}, {})
    with pytest.raises(ConfigError, match="data-path"):
        site_from_context({}, {})
    with pytest.raises(ConfigError, match="epsilon-budget"):
        site_from_context({"data-path": str(tiny_sites[0]), "epsilon-budget": -1.0}, {})


def test_a_deployed_site_caps_the_steps_a_round_may_ask(tiny_sites: list[Path]) -> None:
    """``max-steps-per-round`` comes from the node config (default: the hospital policy's
    10 000); a round asking for more, counting the last round's fine-tune, is refused in one line."""
    from medgan_core.tasks.registry import task_config

    site = site_from_context({"data-path": str(tiny_sites[0]), "max-steps-per-round": "500", "site-name": "st-mary"}, {})
    assert site.max_steps_per_round == 500
    assert site.work_refusal(task_config(local_steps=500), 0) == ""
    assert site.work_refusal(task_config(local_steps=400), 101) == (
        "site st-mary runs at most 500 training steps a round (max-steps-per-round), the study asks for 400 local "
        "steps + 101 fine-tune steps; refused by the site's policy")
    # several views of each record a step are that many steps of work
    views = task_config(name="denoise", local_steps=200, views_per_record=3)
    assert site.work_refusal(views, 0) == (
        "site st-mary runs at most 500 training steps a round (max-steps-per-round), the study asks for 200 local "
        "steps, each of 3 views of every record (600 steps of work); refused by the site's policy")
    assert site.work_refusal(task_config(name="denoise", local_steps=250, views_per_record=2), 0) == ""
    assert SiteConfig(str(tiny_sites[0])).work_refusal(task_config(local_steps=10**9), 10**5) == ""  # simulation: no cap
    for bad, message in ((-1, "max-steps-per-round = -1; it must be >= 0"), ("lots", "max-steps-per-round = 'lots'")):
        with pytest.raises(ConfigError, match=message):
            site_from_context({"data-path": str(tiny_sites[0]), "max-steps-per-round": bad}, {})


def test_a_deployed_site_caps_the_batch_a_study_may_ask(tiny_sites: list[Path]) -> None:
    """``max-batch-size`` (hospital default 512): a step's time and memory grow with the batch,
    so a study asking for more is refused in one line."""
    from medgan_core.tasks.registry import task_config

    site = site_from_context({"data-path": str(tiny_sites[0]), "site-name": "st-mary"}, {})
    assert site.max_batch_size == 512 and site.work_refusal(task_config(batch_size=512), 0) == ""
    assert site.work_refusal(task_config(batch_size=10**6), 0) == (
        "site st-mary takes batches of at most 512 records (max-batch-size), the study asks for task.batch-size = "
        "1000000; refused by the site's policy")
    small = site_from_context({"data-path": str(tiny_sites[0]), "max-batch-size": "16"}, {})
    assert "max-batch-size" in small.work_refusal(task_config(batch_size=17), 0)
    assert SiteConfig(str(tiny_sites[0])).work_refusal(task_config(batch_size=10**6), 0) == ""  # simulation: no cap
    with pytest.raises(ConfigError, match="max-batch-size = -2; it must be >= 0"):
        site_from_context({"data-path": str(tiny_sites[0]), "max-batch-size": -2}, {})


@pytest.mark.parametrize("given", [16, "16"])
def test_a_site_sets_its_own_physical_batch(tiny_sites: list[Path], given: object) -> None:
    """A hospital with less memory bounds its own passes (``physical-batch`` in its node
    config); the study's task is otherwise what the site runs."""
    site = site_from_context({"data-path": str(tiny_sites[0]), "physical-batch": given}, {})
    assert site.physical_batch == 16
    study = task_config(name="denoise", batch_size=64, physical_batch=32)
    assert site_task(study, site) == dataclasses.replace(study, physical_batch=16)
    assert site_task(study, SiteConfig(str(tiny_sites[0]))) is study  # 0: the study's setting
    for bad, message in ((-1, "physical-batch = -1; it must be >= 0"), ("many", "physical-batch = 'many'"),
                         (2.5, "physical-batch = 2.5"), (True, "physical-batch = True")):
        with pytest.raises(ConfigError, match=message):
            site_from_context({"data-path": str(tiny_sites[0]), "physical-batch": bad}, {})


def test_simulated_node_maps_partition_to_site(tiny_sites: list[Path], tmp_path: Path) -> None:
    run_config = {"run.sites-dir": str(tiny_sites[0].parent), "run.out-dir": str(tmp_path)}
    sites = [site_from_context({"partition-id": i}, run_config) for i in range(2)]
    assert [Path(s.data_path) for s in sites] == sorted(tiny_sites)
    assert sites[0].state_dir == str(tmp_path / "site-state" / sorted(tiny_sites)[0].name)
    with pytest.raises(ConfigError, match="has no site"):
        site_from_context({"partition-id": 5}, run_config)
    given = [SiteConfig(str(tiny_sites[1]), state_dir="/s")]
    assert site_from_context({"partition-id": 0}, {}, given) == given[0]


def test_site_seed_is_stable_and_differs_by_site_and_round() -> None:
    assert site_seed(0, 1, "/a/site-1") == site_seed(0, 1, "/elsewhere/site-1")  # a moved study trains the same
    assert len({site_seed(0, 1, "/x/a"), site_seed(0, 2, "/x/a"), site_seed(0, 1, "/x/b")}) == 3
