"""One site's part of one round, as plain Python: the privacy-critical path of a client.

The ClientApp calls this; tests and notebooks can too. With privacy on (the default) it
refuses models Opacus cannot train, derives the site's DP-SGD noise, checks the budget
before any step, trains, and persists the accountant before anything is sent.
"""

from __future__ import annotations

from pathlib import Path

from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.data.dataset import SiteData
from medgan_core.errors import ConfigError
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import validate_private_modules
from medgan_core.privacy.planning import check_budget, plan_dp
from medgan_core.tasks.base import Task


def accountant_path(state_dir: str | Path, study_id: str) -> Path:
    return Path(state_dir) / f"accountant-{study_id}.json"


def train_site_round(
    task: Task,
    data: SiteData,
    site: SiteConfig,
    privacy: PrivacyConfig,
    *,
    planned_rounds: int,
    study_id: str,
    seed: int,
) -> dict[str, float]:
    """Train ``task`` locally for one round; return the scalar metrics the site may send."""
    steps = task.config.local_steps
    if not privacy.enabled:
        metrics = task.train(data, steps, seed)
        return {**metrics, "dp": 0.0}
    if not site.state_dir:
        raise ConfigError(f"site {site.site_name}: no state-dir; differential privacy needs one to keep its accountant")
    validate_private_modules(task.private_modules)
    releases = planned_rounds * steps * task.dp_releases_per_step
    dp = plan_dp(privacy, data.num_train, task.config.batch_size, releases)
    accountant = SiteAccountant(privacy.accountant, privacy.delta, accountant_path(site.state_dir, study_id))
    budget = site.budget(privacy)
    check_budget(accountant, dp, steps * task.dp_releases_per_step, budget, site.site_name)
    metrics = task.train(data, steps, seed, dp=dp, accountant=accountant)
    accountant.save()  # before the update leaves: a crash after this over-counts, never under-counts
    return {
        **metrics,
        "dp": 1.0,
        "epsilon": accountant.epsilon(),
        "epsilon-budget": budget,
        "delta": privacy.delta,
        "noise-multiplier": dp.noise_multiplier,
        "max-grad-norm": dp.max_grad_norm,
        "sample-rate": dp.sample_rate,
        "dp-steps": float(accountant.steps),
    }
