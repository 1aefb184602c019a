"""`study compare`'s tables from its results, without training: with and without the ε–utility
curve, and the share of the non-DP gain each DP point keeps."""

from __future__ import annotations

from medgan.compare import NO_DP, _markdown


def _scores(psnr: float, psnr_input: float = 20.0) -> dict[str, dict[str, float]]:
    return {site: {"psnr": psnr, "psnr-input": psnr_input} for site in ("A", "B")}


def _results(privacy: bool) -> dict:
    scores = {"federated": _scores(28.0), "local only": _scores(26.0), "pooled": _scores(30.0)}
    curve = []
    if privacy:
        scores |= {"federated, ε=1": _scores(22.0), NO_DP: _scores(30.0)}
        curve = [{"arm": "federated, ε=1", "target-epsilon": 1.0, "epsilon-spent": 0.99},
                 {"arm": "federated", "target-epsilon": 8.0, "epsilon-spent": 7.98}]
    return {"task": "denoise", "headline": "psnr", "privacy": privacy, "delta": 1e-5, "rounds": 2, "local-steps": 3,
            "sites": ["A", "B"], "scores": scores, "leave-one-out": {}, "epsilon-utility": curve,
            "seconds": {"federated": 1.0}, "initial-model": "public.medgan" if privacy else None}


def test_without_dp_there_is_no_curve() -> None:
    table = _markdown(_results(privacy=False))
    assert "ε–utility" not in table and "DP off" in table and "run.initial-model" not in table
    assert "The federation reaches 80% of pooled training's gain." in table


def test_each_dp_point_shows_the_share_of_the_non_dp_gain_it_keeps() -> None:
    table = _markdown(_results(privacy=True))
    assert "| 1 | 0.99 | 22.000 | 20% |" in table  # gain 2 dB of the non-DP federation's 10 dB
    assert "| 8 | 7.98 | 28.000 | 80% |" in table
    assert "| no DP | ∞ | 30.000 | 100% |" in table
    assert "Every arm starts from `public.medgan`" in table
