"""GAN-aware aggregation as plain Python: policies per group, local arrays, site state, FedProx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.study_config import StudyConfig
from medgan_core.errors import ConfigError
from medgan_core.sharing import local_array_names, norm_array_names
from medgan_core.site_round import load_site_model, shared_weights, train_site_round
from medgan_core.site_state import SiteState
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, task_config
from medgan_core.policies.robust import TrimmedMean
from strategies.aggregation import aggregate_by_policy

DENOISE = task_config(name="denoise", image_size=16, width=8, batch_size=8, local_steps=3,
                     lr_generator=2e-3, lr_discriminator=2e-3)


def _site_arrays(g: float, d: float) -> dict[str, np.ndarray]:
    return {"generator.w": np.full((2, 2), g, np.float32), "discriminator.w": np.full(3, d, np.float32)}


def test_each_group_is_combined_by_its_own_policy() -> None:
    sites = [_site_arrays(v, v) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]  # the last site is off the scale
    weights = [1, 1, 1, 1, 6]
    out = aggregate_by_policy(sites, weights, {"generator": "median", "discriminator": "average"}, AggregationConfig())
    np.testing.assert_allclose(out["generator.w"], 2.0)  # median ignores the outlier …
    np.testing.assert_allclose(out["discriminator.w"], (0 + 1 + 2 + 3 + 600) / 10)  # … the weighted mean does not
    trimmed = TrimmedMean(AggregationConfig(trim_fraction=0.2)).combine(sites, weights)  # drops one site at each end
    np.testing.assert_allclose(trimmed["generator.w"], 2.0)
    assert out["generator.w"].dtype == np.float32


def test_only_arrays_that_arrived_are_combined() -> None:
    sites = [{"generator.w": np.full(2, v, np.float32)} for v in (1.0, 3.0)]  # D stayed at the sites
    assert set(aggregate_by_policy(sites, [1, 1], {}, AggregationConfig())) == {"generator.w"}
    with pytest.raises(ConfigError, match="cannot combine"):
        aggregate_by_policy(sites, [1, 1], {"generator": "local"}, AggregationConfig())


def test_local_groups_and_fedbn_norm_layers_are_named_from_the_model() -> None:
    task = build_task(DENOISE)
    names = set(task.weight_shapes())
    d_local = local_array_names(task.groups, AggregationConfig(group_policies="discriminator=local"))
    assert d_local == {n for n in names if n.startswith("discriminator.")}
    fedbn = local_array_names(task.groups, AggregationConfig(local_norm=True))
    assert fedbn == norm_array_names(task.groups)
    assert "generator.enc1.1.weight" in fedbn and "generator.enc1.1.bias" in fedbn  # GroupNorm of the first block
    assert "generator.enc1.0.weight" not in fedbn  # a convolution is shared
    assert local_array_names(task.groups, AggregationConfig()) == set()
    with pytest.raises(ConfigError, match="this task's groups are generator, discriminator"):
        local_array_names(task.groups, AggregationConfig(group_policies="generator_ab=local"))


def test_local_calibration_names_the_site_calibration_layers_only() -> None:
    cycle = build_task(task_config(name="cycle", width=8))
    local = local_array_names(cycle.groups, AggregationConfig(local_calibration=True))
    assert local == {f"generator.calibrate_{d}.map.{k}" for d in ("ab", "ba") for k in ("weight", "bias")}
    assert local <= set(cycle.weight_shapes())
    assert local_array_names(build_task(DENOISE).groups, AggregationConfig(local_calibration=True)) == set()
    assert AggregationConfig(local_calibration=True).has_site_state and not AggregationConfig().has_site_state


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"aggregation": {"policy": "mean"}}, "aggregation.policy = 'mean'; choose one of average, local"),
        ({"aggregation": {"group_policies": "discriminator"}}, "write GROUP=POLICY"),
        ({"aggregation": {"group_policies": "generator=best"}}, "group-policies (generator) = 'best'"),
        ({"aggregation": {"trim_fraction": 0.5}}, "trim-fraction"),
        ({"aggregation": {"server_optimizer": "sgd"}}, "choose one of fedavg, fedadam, fedyogi"),
        ({"aggregation": {"proximal_mu": -1.0}}, "proximal-mu"),
        ({"aggregation": {"policy": "median"}, "privacy": {"central_noise_multiplier": 1.0}}, "central DP"),
        ({"aggregation": {"group_policies": "discriminator=local"}, "privacy": {"secagg": True}}, "secagg"),
    ],
)
def test_bad_aggregation_settings_name_the_key(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        StudyConfig().replace(**changes)
    assert fragment in str(info.value)


def test_a_study_toml_can_set_aggregation(tmp_path: Path) -> None:
    from medgan_core.study_config import load_study

    path = tmp_path / "study.toml"
    path.write_text('[aggregation]\npolicy = "median"\ngroup-policies = "discriminator=local"\nlocal-norm = true\n')
    agg = load_study(path).aggregation
    assert agg.policies(["generator", "discriminator"]) == {"generator": "median", "discriminator": "local"}
    assert agg.has_site_state


def test_site_keeps_local_arrays_and_optimizer_state_between_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    agg = AggregationConfig(group_policies="discriminator=local", keep_optimizer_state=True)
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path))
    data = load_task_data(tiny_sites[0], DENOISE)
    task = build_task(DENOISE)
    initial = task.get_weights()
    train_site_round(task, data, site, PrivacyConfig(enabled=False), planned_rounds=2, study_id="s",
                     seed=1, aggregation=agg, server_round=1)
    after_round_1 = task.get_weights()
    sent, shapes = shared_weights(task, agg)
    assert set(sent) == set(shapes) == {n for n in initial if n.startswith("generator.")}  # D never leaves

    state = SiteState(tmp_path, "s")
    assert state.rounds() == [1]
    saved = state.latest(before=2)
    assert saved is not None and set(saved.local) == {n for n in initial if n.startswith("discriminator.")}
    assert any(k.endswith(".exp_avg") for k in saved.optimizer) and any(k.endswith(".step") for k in saved.optimizer)

    # Round 2 starts from the global model the server sends, plus this site's own D and Adam state.
    task2 = build_task(DENOISE)
    assert state.latest(before=1) is None
    load_site_model(task2, site, agg, study_id="s", server_round=2, training=True)
    for name, value in task2.get_weights().items():
        expected = after_round_1[name] if name.startswith("discriminator.") else initial[name]
        np.testing.assert_array_equal(value, expected)
    steps = {k: v for k, v in task2.optimizer_state().items() if k.endswith(".step")}
    assert steps and all(float(v) == DENOISE.local_steps for v in steps.values())


def test_site_state_is_required_and_old_rounds_are_pruned(tiny_sites: list[Path], tmp_path: Path) -> None:
    agg = AggregationConfig(local_norm=True)
    task = build_task(DENOISE)
    with pytest.raises(ConfigError, match="no state-dir"):
        load_site_model(task, SiteConfig(str(tiny_sites[0])), agg, study_id="s", server_round=1, training=True)
    state = SiteState(tmp_path, "s")
    for r in range(1, 6):
        state.save(r, {"generator.x": np.full(2, r, np.float32)}, {})
    assert state.rounds() == [3, 4, 5]
    assert state.latest(before=5).server_round == 4  # a round run again starts where it started before
    (state.path(5)).write_bytes(b"garbage")
    with pytest.raises(Exception, match="unreadable"):
        state.latest(before=6)


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_pulls_shared_weights_back_to_the_global_model(
    tiny_sites: list[Path], tmp_path: Path, private: bool
) -> None:
    """lr * mu = 1 is the extreme case: after every step the shared weights return exactly to
    the round's global weights, while local (un-anchored) ones still learn. Under DP the
    step runs after Opacus' noisy update."""
    data = load_task_data(tiny_sites[0], DENOISE)
    privacy = PrivacyConfig(enabled=private, secure_rng=False)
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path))
    changed = {}
    for mu in (0.0, 1.0 / DENOISE.lr_generator):
        task = build_task(DENOISE)
        before = task.get_weights()
        agg = AggregationConfig(group_policies="discriminator=local", proximal_mu=mu)
        train_site_round(task, data, site, privacy, planned_rounds=1, study_id=f"p{mu}", seed=3,
                         aggregation=agg, server_round=1)
        after = task.get_weights()
        changed[mu] = {n for n in before if not np.array_equal(before[n], after[n])}
    assert any(n.startswith("generator.") for n in changed[0.0])
    assert not any(n.startswith("generator.") for n in changed[1.0 / DENOISE.lr_generator])
    assert any(n.startswith("discriminator.") for n in changed[1.0 / DENOISE.lr_generator])


def test_the_report_says_which_arrays_stay_at_the_sites() -> None:
    from server.report import aggregation_line

    line = aggregation_line(StudyConfig().replace(task={"name": "cycle"}, aggregation={"local_calibration": True}))
    assert "site-calibration layers (output gain and offset) kept at each site" in line
    assert "Local arrays stay at the sites" in line
    assert "Local arrays" not in aggregation_line(StudyConfig())
