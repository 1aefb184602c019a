"""What may leave a site, and how updates are combined."""

import numpy as np
import pytest

from client.payload import evaluate_reply, train_reply
from medgan_core.errors import WeightsError
from strategies.aggregation import aggregate_by_group, split_groups, weighted_mean

SHAPES = {"generator.w": (2, 2), "discriminator.w": (3,)}


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()}


def test_train_reply_holds_one_array_record_and_scalar_metrics() -> None:
    content = train_reply(_arrays(1.0), SHAPES, {"loss-d": 0.5}, num_examples=12)
    assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
    assert not content.config_records
    assert set(content["arrays"].keys()) == set(SHAPES)
    assert dict(content["metrics"]) == {"num-examples": 12, "loss-d": 0.5}


def test_a_site_cannot_send_an_image_or_per_sample_values() -> None:
    image = np.zeros((64, 64), np.float32)
    with pytest.raises(WeightsError, match="unexpected"):
        train_reply({**_arrays(0.0), "generator.leak": image}, SHAPES, {}, 4)
    with pytest.raises(WeightsError, match="shape"):
        train_reply({**_arrays(0.0), "generator.w": image}, SHAPES, {}, 4)
    with pytest.raises(WeightsError, match="not a finite scalar"):
        evaluate_reply({"per-sample": [0.1, 0.2]}, 4)  # type: ignore[dict-item]
    with pytest.raises(WeightsError, match="not a finite scalar"):
        evaluate_reply({"swd": float("nan")}, 4)


def test_weighted_mean_by_sample_count() -> None:
    mean = weighted_mean([_arrays(1.0), _arrays(4.0)], [1, 2])
    np.testing.assert_allclose(mean["generator.w"], 3.0)
    with pytest.raises(ValueError):
        weighted_mean([_arrays(1.0)], [0])


def test_aggregate_by_group_averages_each_group() -> None:
    a, b = _arrays(0.0), _arrays(10.0)
    b["discriminator.w"][:] = 20.0
    out = aggregate_by_group([a, b], [3, 1], ["generator", "discriminator"])
    np.testing.assert_allclose(out["generator.w"], 2.5)
    np.testing.assert_allclose(out["discriminator.w"], 5.0)
    assert set(split_groups(out)) == {"generator", "discriminator"}


def test_central_dp_clips_each_site_and_adds_noise_of_the_right_size() -> None:
    from strategies.central_dp import CentralDP

    current = {"generator.w": np.zeros(10000, np.float32)}
    far = {"generator.w": np.full(10000, 1.0, np.float32)}  # update norm 100
    near = {"generator.w": np.full(10000, 0.001, np.float32)}  # update norm 0.1
    quiet = CentralDP(noise_multiplier=1e-9, clipping_norm=1.0, seed=0)
    out = quiet.aggregate([far, near], current)["generator.w"]
    # far is clipped to norm 1 (0.01 per entry), near is kept, equal weights
    np.testing.assert_allclose(out, (0.01 + 0.001) / 2, atol=1e-6)
    noisy = CentralDP(noise_multiplier=2.0, clipping_norm=1.0, seed=0)
    out = noisy.aggregate([far, near], current)["generator.w"]
    assert noisy.last_std == pytest.approx(2.0 * 1.0 / 2)
    assert np.std(out - 0.0055) == pytest.approx(1.0, rel=0.05)
