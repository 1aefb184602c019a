"""How much noise a site needs, and whether it may train another round."""

from __future__ import annotations

import math

from opacus.accountants.utils import get_noise_multiplier

from medgan_core.config import PrivacyConfig
from medgan_core.errors import PrivacyBudgetExhausted, PrivacyError
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, joint_noise_multiplier


def plan_dp(
    privacy: PrivacyConfig,
    num_examples: int,
    batch_size: int,
    planned_steps: int,
    releases_per_step: int = 1,
    epsilon: float | None = None,
) -> DPSettings:
    """DP-SGD settings for a site of ``num_examples`` training records (``privacy.unit``: slices or patients).

    The expected batch is ``batch_size`` (sample rate q = batch / N, capped at 1). The noise
    multiplier each private network uses is given (``noise-multiplier``), or derived so
    that ``planned_steps`` steps of the joint mechanism of ``releases_per_step`` networks
    (``joint_noise_multiplier``) spend ``epsilon`` (default ``target-epsilon``) and no more.
    """
    if num_examples <= 0:
        raise PrivacyError("a site with no training images cannot train")
    sample_rate = min(1.0, batch_size / num_examples)
    target = privacy.target_epsilon if epsilon is None else epsilon
    if privacy.noise_multiplier > 0:
        sigma = privacy.noise_multiplier
    else:
        try:  # Opacus' search returns a σ whose ε lies at or just below the target
            joint = float(get_noise_multiplier(
                target_epsilon=target, target_delta=privacy.delta, sample_rate=sample_rate,
                steps=planned_steps, accountant=privacy.accountant,
            ))
        except ValueError as exc:
            raise PrivacyError(
                f"no noise level reaches ε = {target} at δ = {privacy.delta} "
                f"over {planned_steps} steps at sample rate {sample_rate:.3f}: {exc}"
            ) from exc
        sigma = joint * math.sqrt(releases_per_step)
    expected_batch = max(1, round(sample_rate * num_examples))
    return DPSettings(sigma, privacy.max_grad_norm, sample_rate, expected_batch, privacy.secure_rng, privacy.unit)


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
