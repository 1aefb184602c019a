"""``task.histogram-start``: CycleGAN's generators start from the site's own histogram
matching of scanner B's body pixels to scanner A's. The map is that matching (and its
inverse), an untrained model equals it, its knots (the site's pixel quantiles) never
leave the site, the site keeps them between rounds, and the study refuses it under DP or
without a place to keep it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.exposure import match_histograms

from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.data.dataset import SiteData
from medgan_core.errors import ConfigError, MedGANError, PrivacyError
from medgan_core.models.intensity_map import IntensityMap
from medgan_core.sharing import local_array_names
from medgan_core.site_round import load_site_model, shared_weights, train_site_round
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data, task_config

CONFIG = task_config(name="cycle", image_size=32, width=8, batch_size=4, local_steps=2, histogram_start=True)
MAP = {"generator.match.source", "generator.match.target"}
LEVEL = -0.5


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scanner A and a scanner B of other subjects reading with another gain and offset, air above."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(20, 1, 48, 48, generator=g) * 1.4 - 0.4
    b = a[torch.randperm(20, generator=g)] * 0.8 + 0.1 + 0.02 * torch.randn(20, 1, 48, 48, generator=g)
    a[..., :8, :] = b[..., :8, :] = -0.9  # air
    return a, b


def test_the_map_is_body_histogram_matching_and_inverts() -> None:
    a, b = _pair()
    match = IntensityMap()
    assert not match.fitted and torch.equal(match(b), b)  # the identity until fitted
    match.fit(b, a, LEVEL)
    assert match.fitted
    out = match(b)
    body = b > LEVEL
    expected = torch.from_numpy(match_histograms(b[body].numpy(), a[a > LEVEL].numpy())).float()
    assert (out[body] - expected).abs().mean() < 2e-3  # about 2 HU; fitted on a quarter of the pixels
    assert (out[body] - expected).abs().max() < 0.01
    assert torch.equal(out[~body], b[~body])  # air left as it is
    assert abs(float(out[body].mean() - a[a > LEVEL].mean())) < 2e-3  # B's offset and gain gone
    torch.testing.assert_close(match(out, inverse=True), b, atol=1e-5, rtol=0)


def test_too_few_body_pixels_is_one_clear_error(tiny_sites: list[Path]) -> None:
    task = build_task(CONFIG)
    data = load_task_data(tiny_sites[0], CONFIG)
    air = SiteData(site="air-only", train=torch.full_like(data.train, -1.0), test=data.test,
                   train_input=torch.full_like(data.train_input, -1.0))
    with pytest.raises(MedGANError, match="site air-only: task.histogram-start cannot fit its intensity map: only 0"):
        task.fit_histogram_match(air)


def test_an_untrained_model_is_the_sites_histogram_matching(tiny_sites: list[Path]) -> None:
    task = build_task(CONFIG)
    data = load_task_data(tiny_sites[0], CONFIG)
    assert data.train_input is not None and data.test_input is not None
    task.train(data, 0, seed=0)  # fits the map, takes no step
    match = task.generator.match
    assert match.fitted
    b = data.test_input
    torch.testing.assert_close(task.generator(b, "ba"), match(b))
    torch.testing.assert_close(task.generator(data.test, "ab"), match(data.test, inverse=True))
    level = task.body_level
    body = data.test > level
    raw, matched = (b - data.test)[body], (match(b) - data.test)[body]
    assert float(raw.mean()) > 0.015  # hospital A's scanner B reads about +45 HU (0.022 of the range) too high
    assert abs(float(matched.mean())) < float(raw.mean()) * 0.6  # fitted on other (training) subjects
    assert float(matched.abs().mean()) < float(raw.abs().mean()) * 0.6

    plain = build_task(task_config(name="cycle", image_size=32, width=8))
    assert plain.generator.match is None and not any("match" in n for n in plain.get_weights())


def test_a_site_without_a_map_is_scored_through_its_matching_not_the_identity(tiny_sites: list[Path]) -> None:
    """Round 0, or a site that has not trained: its held-out score is that of its own histogram
    matching (what the untrained model is), the same as after a training call that took no step."""
    data = load_task_data(tiny_sites[0], CONFIG)
    fresh = build_task(CONFIG)
    identity = build_task(CONFIG)
    identity.fit_histogram_match = lambda _data: None  # the old behaviour: the map left unfitted
    unmatched = identity.evaluate(data)
    scores = fresh.evaluate(data)
    assert fresh.generator.match.fitted
    trained = build_task(CONFIG)
    trained.train(data, 0, seed=0)
    assert scores == trained.evaluate(data)
    assert scores != unmatched and scores["psnr"] > unmatched["psnr"]


def test_the_map_never_leaves_the_site_and_is_kept_there(tiny_sites: list[Path], tmp_path: Path) -> None:
    task = build_task(CONFIG)
    assert MAP <= local_array_names(task.groups, AggregationConfig())  # whatever the aggregation settings
    agg = AggregationConfig(local_calibration=True)
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path))
    received = task.get_weights()
    train_site_round(task, load_task_data(tiny_sites[0], CONFIG), site, PrivacyConfig(enabled=False),
                     planned_rounds=2, study_id="s", seed=3, aggregation=agg, server_round=1)
    sent, shapes = shared_weights(task, agg)
    assert not MAP & set(sent) and not MAP & set(shapes)
    fitted = {name: task.get_weights()[name] for name in MAP}
    assert not np.array_equal(fitted["generator.match.source"], received["generator.match.source"])

    evaluated = build_task(CONFIG)  # the global model (identity map) evaluated at the site
    evaluated.set_weights({**evaluated.get_weights(), **sent})
    load_site_model(evaluated, site, agg, study_id="s", server_round=1, training=False)
    for name, value in fitted.items():
        np.testing.assert_array_equal(evaluated.get_weights()[name], value)


def test_a_coordinator_cannot_make_a_site_send_its_map_or_fit_it_under_dp(tiny_sites: list[Path],
                                                                          tmp_path: Path) -> None:
    """Round instructions that skip the study's own checks: no local-calibration (the map has
    nowhere to be kept), or DP on. The site still keeps its map, and refuses DP before a step."""
    task = build_task(CONFIG)
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path))
    data = load_task_data(tiny_sites[0], CONFIG)
    plain = AggregationConfig()
    train_site_round(task, data, site, PrivacyConfig(enabled=False), planned_rounds=1, study_id="s", seed=3,
                     aggregation=plain, server_round=1)
    assert task.generator.match.fitted  # it trained from its map...
    sent, shapes = shared_weights(task, plain)
    assert not MAP & set(sent) and not MAP & set(shapes)  # ...and sends none of it

    untouched = build_task(CONFIG)
    before = untouched.get_weights()
    with pytest.raises(PrivacyError, match="task.histogram-start fits .* outside DP-SGD's per-record guarantee"):
        train_site_round(untouched, data, site, PrivacyConfig(), planned_rounds=1, study_id="dp", seed=3,
                         aggregation=AggregationConfig(local_calibration=True), server_round=1)
    for name, value in untouched.get_weights().items():  # refused before any step or fit
        np.testing.assert_array_equal(value, before[name])


def _study(**aggregation: object) -> dict:
    return {"task": {"name": "cycle", "histogram-start": True}, "privacy": {"enabled": False},
            "aggregation": aggregation}


def test_the_study_refuses_it_without_a_place_to_keep_it_and_under_dp() -> None:
    StudyConfig.from_dict(_study(**{"local-calibration": True}))  # accepted
    with pytest.raises(ConfigError, match="task.histogram-start .* set aggregation.local-calibration = true"):
        StudyConfig.from_dict(_study())
    private = {**_study(**{"local-calibration": True}), "privacy": {"enabled": True}}
    with pytest.raises(ConfigError, match="task.histogram-start fits .* outside DP-SGD's per-record guarantee"):
        StudyConfig.from_dict(private)


def test_a_new_hospital_fits_its_own_map_with_adapt(tiny_sites: list[Path], tmp_path: Path) -> None:
    """Exported for a hospital outside the study the map is the identity (the coordinator never
    had one); ``medgan adapt`` fits it to that hospital's own scanners, shared arrays untouched."""
    from client.adapt import adapt_model
    from client.infer import Applier
    from medgan_core.checkpoints import save_checkpoint
    from medgan_core.model_file import load_model
    from server.export import export_model
    from server.run_folder import RunFolder

    study = StudyConfig().replace(task={"name": "cycle", "image_size": 32, "width": 8, "batch_size": 4,
                                        "histogram_start": True},
                                  privacy={"enabled": False}, aggregation={"local_calibration": True})
    folder = RunFolder(tmp_path / "run").start(study)
    save_checkpoint(folder.checkpoint(1), build_task(study.task).get_weights(), {"round": 1, "study": study.to_dict()})
    folder.append_metrics({"round": 1, "sites": [{"node": 1, "train": {}}], "evaluate": {}})
    model = load_model(export_model(folder.root, tmp_path / "study.medgan", for_new_site=True))
    np.testing.assert_array_equal(model.arrays["generator.match.source"], model.arrays["generator.match.target"])

    with pytest.raises(MedGANError, match="holds none .* fit it to your scanners with 'medgan adapt'"):
        Applier(model)  # medgan infer refuses a model that would read scans without its matching

    adapted = load_model(adapt_model(model, tiny_sites[1], tmp_path / "ours.medgan", steps=1).path)
    assert Applier(adapted).task.unready_words() == ""
    own = build_task(study.task)
    own.fit_histogram_match(load_task_data(tiny_sites[1], study.task))
    for name in MAP:
        np.testing.assert_array_equal(adapted.arrays[name], own.get_weights()[name])
    assert not np.array_equal(adapted.arrays["generator.match.source"], adapted.arrays["generator.match.target"])
    # shared arrays untouched, the shared discriminator too (it learnt during adapt as the
    # calibration's adversary, and was put back)
    for name in ("generator.ba.out.weight", "discriminator.a.net.0.weight"):
        np.testing.assert_array_equal(adapted.arrays[name], model.arrays[name])
    assert not np.array_equal(adapted.arrays["generator.calibrate_ba.map.bias"],
                              model.arrays["generator.calibrate_ba.map.bias"])  # the calibration learnt
