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


def test_the_targets_say_met_or_missed_and_by_how_much() -> None:
    results = _results(privacy=True)
    results["scores"]["local only"]["B"]["psnr"] = 28.5  # beats the federation at B by 0.5 dB
    results["leave-one-out"] = {"A": {"federated (others)": {"psnr": 27.0}, "single sites": {"B": {"psnr": 26.0}}},
                                "B": {"federated (others)": {"psnr": 27.0}, "single sites": {"A": {"psnr": 27.25}}}}
    table = _markdown(results)
    assert "- federated ≥ local only at every site: **missed** (smallest margin -0.500 at B)" in table
    assert "- ≥ 95% of pooled training's gain: **missed** (80%)" in table
    assert ("- left out, the federation beats every single-site model: **missed** "
            "(smallest margin over the best single site -0.250 at B)") in table
    assert "- DP at ε = 8 keeps ≥ 85% of the non-DP gain: **missed** (80%)" in table
    results["scores"]["local only"]["B"]["psnr"] = 26.0
    results["scores"]["pooled"] = _scores(28.2)  # the federation's 8 dB gain is 98 % of 8.2
    results["leave-one-out"]["B"]["single sites"]["A"]["psnr"] = 26.5
    table = _markdown(results)
    assert "every site: met (smallest margin +2.000 at A)" in table and "gain: met (98%)" in table
    assert "single-site model: met (smallest margin over the best single site +0.500 at B)" in table


def test_for_a_lower_is_better_metric_a_lower_score_meets_the_target() -> None:
    results = _results(privacy=False)
    results["headline"] = "mae-hu"
    for arm, value in (("federated", 50.0), ("local only", 60.0), ("pooled", 40.0)):
        results["scores"][arm] = {site: {"mae-hu": value} for site in ("A", "B")}
    table = _markdown(results)
    assert "every site: met (smallest margin +10.000 at A)" in table and "pooled training's gain" not in table


def test_the_command_and_the_machine_are_recorded() -> None:
    results = _results(privacy=False) | {"command": "medgan study compare --config s.toml", "machine": "2 CPUs (x86_64)"}
    assert "Command: `medgan study compare --config s.toml`; machine: 2 CPUs (x86_64)." in _markdown(results)


def test_the_seed_is_said_where_the_results_record_it() -> None:
    results = _results(privacy=False)
    assert "2 sites, 2 rounds × 3 local steps, DP off" in _markdown(results)  # results written before the seed was
    assert "2 sites, 2 rounds × 3 local steps, seed 2, DP off" in _markdown(results | {"seed": 2})
