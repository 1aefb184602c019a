"""Policy names (``aggregation.policy``, ``group-policies``) to policy classes.

Built-in policies are registered in ``BUILT_IN``, one line each; a policy written outside
this package registers with one line in its own package's metadata, an entry point in the
``medgan.policies`` group (``equal-mean = "my_policies:EqualMean"``).
"""

from __future__ import annotations

from medgan_core.errors import ConfigError
from medgan_core.plugins import load_registered, registered
from medgan_core.policies.base import CombinePolicy

BUILT_IN = {
    "average": "medgan_core.policies.mean:WeightedMean",
    "trimmed-mean": "medgan_core.policies.robust:TrimmedMean",
    "median": "medgan_core.policies.robust:Median",
}
ENTRY_POINT_GROUP = "medgan.policies"
#: Not a way of combining: the group stays at each site (its weights are never sent).
LOCAL = "local"


def _targets() -> dict[str, str]:
    return registered(ENTRY_POINT_GROUP, BUILT_IN, "aggregation policy", frozenset({LOCAL}))


def policy_names() -> list[str]:
    """Every policy a study may name, ``local`` included."""
    return sorted({*_targets(), LOCAL})


def policy_class(name: str) -> type[CombinePolicy]:
    targets = _targets()
    if name not in targets:
        raise ConfigError(f"aggregation policy {name!r} cannot combine arrays; choose one of {', '.join(policy_names())}")
    return load_registered("aggregation policy", name, targets[name], CombinePolicy)
