"""How much noise a site needs, and whether it may train another round."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from opacus.accountants.utils import get_noise_multiplier

from medgan_core.config import PrivacyConfig
from medgan_core.errors import PrivacyBudgetExhausted, PrivacyError
from medgan_core.fileio import atomic_write_text
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, joint_noise_multiplier

log = logging.getLogger(__name__)

#: Opacus' search stops once ε is within this of the target, from below (``epsilon_tolerance``).
SEARCH_TOLERANCE = 0.01


def plan_dp(
    privacy: PrivacyConfig,
    num_examples: int,
    batch_size: int,
    planned_steps: int,
    releases_per_step: int = 1,
    epsilon: float | None = None,
    plans: Path | None = None,
) -> DPSettings:
    """DP-SGD settings for a site of ``num_examples`` training records (``privacy.unit``: slices or patients).

    The expected batch is ``batch_size`` (sample rate q = batch / N, capped at 1). The noise
    multiplier each private network uses is given (``noise-multiplier``), or derived so
    that ``planned_steps`` steps of the joint mechanism of ``releases_per_step`` networks
    (``joint_noise_multiplier``) spend ``epsilon`` (default ``target-epsilon``) and no more.
    ``plans``: a file of the site's earlier searches (``noise_for``).
    """
    if num_examples <= 0:
        raise PrivacyError("a site with no training images cannot train")
    sample_rate = min(1.0, batch_size / num_examples)
    target = privacy.target_epsilon if epsilon is None else epsilon
    if privacy.noise_multiplier > 0:
        sigma = privacy.noise_multiplier
    else:
        try:
            joint = noise_for(target, privacy.delta, sample_rate, planned_steps, privacy.accountant, plans)
        except ValueError as exc:
            raise PrivacyError(
                f"no noise level reaches ε = {target} at δ = {privacy.delta} "
                f"over {planned_steps} steps at sample rate {sample_rate:.3f}: {exc}"
            ) from exc
        sigma = joint * math.sqrt(releases_per_step)
    expected_batch = max(1, round(sample_rate * num_examples))
    return DPSettings(sigma, privacy.max_grad_norm, sample_rate, expected_batch, privacy.secure_rng, privacy.unit)


def noise_for(target: float, delta: float, sample_rate: float, steps: int, accountant: str,
              plans: Path | None = None) -> float:
    """The σ whose ε over ``steps`` lies at or just below ``target`` (Opacus' search).

    The search evaluates the privacy bound for a dozen or more candidate σ (seconds of a CPU
    core), and a site plans the same study with the same inputs every round. So a σ found is
    kept in ``plans`` and reused only after one evaluation confirms that its ε lies within
    the search's own tolerance at or below the target: an edited or stale file costs a new
    search, never a σ that would spend more than the target."""
    key = f"{accountant} eps={target!r} delta={delta!r} q={sample_rate!r} steps={steps}"
    known = _read_plans(plans)
    sigma = known.get(key)
    if isinstance(sigma, float) and sigma > 0 and \
            target - SEARCH_TOLERANCE <= SiteAccountant(accountant, delta).epsilon_after(sigma, sample_rate, steps) <= target:
        return sigma
    sigma = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                                       steps=steps, accountant=accountant, epsilon_tolerance=SEARCH_TOLERANCE))
    if plans is not None:
        try:
            atomic_write_text(plans, json.dumps({**known, key: sigma}, indent=1) + "\n")
        except OSError as exc:  # only the next round's time depends on it
            log.warning("could not keep the noise plan in %s (%s); the next round searches again", plans, exc)
    return sigma


def _read_plans(plans: Path | None) -> dict[str, float]:
    if plans is None or not plans.is_file():
        return {}
    try:
        known = json.loads(plans.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: searched again and rewritten
    return known if isinstance(known, dict) else {}


def check_budget(
    accountant: SiteAccountant, dp: DPSettings, steps: int, budget: float, site: str, releases_per_step: int = 1
) -> float:
    """Raise PrivacyBudgetExhausted if ``steps`` more steps would exceed ``budget``; return ε after them."""
    after = accountant.epsilon_after(joint_noise_multiplier(dp.noise_multiplier, releases_per_step), dp.sample_rate, steps)
    if after > budget * (1 + 1e-9):
        raise PrivacyBudgetExhausted(
            f"site {site}: privacy budget reached — ε spent {accountant.epsilon():.3f}, another round "
            f"would bring it to {after:.3f} > budget {budget:g} (δ = {accountant.delta:g}); "
            "this site trains no more in this study"
        )
    return after
