"""Differential privacy for site training: DP-SGD with Opacus and per-site accounting.

See ``PrivacyConfig`` for the settings. Which modules are private is each task's choice
(``Task.private_groups``): every module that reads real images.
"""

from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import DPSettings, make_private, poisson_batch, validate_private_modules
from medgan_core.privacy.planning import check_budget, plan_dp

__all__ = [
    "DPSettings",
    "SiteAccountant",
    "check_budget",
    "make_private",
    "plan_dp",
    "poisson_batch",
    "validate_private_modules",
]
