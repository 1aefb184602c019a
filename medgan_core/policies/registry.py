"""Policy names (``aggregation.policy``, ``group-policies``) to policy classes.

Built-in policies are registered in ``BUILT_IN``, one line each; a policy written outside
this package registers with one line in its own package's metadata, an entry point in the
``medgan.policies`` group (``equal-mean = "my_policies:EqualMean"``).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import import_module, metadata

from medgan_core.errors import ConfigError
from medgan_core.policies.base import CombinePolicy

BUILT_IN = {
    "average": "medgan_core.policies.mean:WeightedMean",
    "trimmed-mean": "medgan_core.policies.robust:TrimmedMean",
    "median": "medgan_core.policies.robust:Median",
}
ENTRY_POINT_GROUP = "medgan.policies"
#: Not a way of combining: the group stays at each site (its weights are never sent).
LOCAL = "local"


@lru_cache(maxsize=8)
def _targets_on(path: tuple[str, ...]) -> dict[str, str]:
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    clash = sorted(plugins.keys() & {*BUILT_IN, LOCAL})
    if clash:
        raise ConfigError(f"an installed package registers aggregation policy {clash[0]!r}, a built-in name; rename it")
    return {**BUILT_IN, **plugins}


def policy_names() -> list[str]:
    """Every policy a study may name, ``local`` included."""
    return sorted({*_targets_on(tuple(sys.path)), LOCAL})


def policy_class(name: str) -> type[CombinePolicy]:
    targets = _targets_on(tuple(sys.path))
    if name not in targets:
        raise ConfigError(f"aggregation policy {name!r} cannot combine arrays; choose one of {', '.join(policy_names())}")
    module, _, attribute = targets[name].partition(":")
    try:
        cls = getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"aggregation policy {name!r} is registered as {targets[name]}, which cannot be loaded "
                          f"({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, CombinePolicy)) or cls.name != name:
        raise ConfigError(f"aggregation policy {name!r} is registered as {targets[name]}, which is not a "
                          f"CombinePolicy named {name!r}")
    return cls
