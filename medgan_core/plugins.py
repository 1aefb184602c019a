"""Finding classes by name: a registry's built-in ``module:Class`` lines plus the entry points
installed packages declare (the way pytest and Flower find plugins). No state of its own:
what is installed is the registry; the lookup is cached per ``sys.path``."""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import import_module, metadata
from typing import Mapping, TypeVar

from medgan_core.errors import ConfigError

T = TypeVar("T")


def registered(group: str, built_in: Mapping[str, str], kind: str, reserved: frozenset[str] = frozenset()) -> dict[str, str]:
    """Name -> ``module:Class`` of every ``kind`` (e.g. "task"): built in, and the entry points of ``group``."""
    return _registered(group, tuple(sorted(built_in.items())), kind, reserved, tuple(sys.path))


@lru_cache(maxsize=16)
def _registered(group: str, built_in: tuple[tuple[str, str], ...], kind: str, reserved: frozenset[str],
                path: tuple[str, ...]) -> dict[str, str]:
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group=group)}
    clash = sorted(plugins.keys() & (dict(built_in).keys() | reserved))
    if clash:
        raise ConfigError(f"an installed package registers {kind} {clash[0]!r}, a built-in name; rename it")
    return {**dict(built_in), **plugins}


def load_registered(kind: str, name: str, target: str, base: type[T]) -> type[T]:
    """The class ``target`` (``module:Class``) registered as ``name``; it must subclass ``base``
    and call itself ``name``."""
    module, _, attribute = target.partition(":")
    try:
        cls = getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{kind} {name!r} is registered as {target}, which cannot be loaded ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)) or getattr(cls, "name", None) != name:
        raise ConfigError(f"{kind} {name!r} is registered as {target}, which is not a {base.__name__} named {name!r}")
    return cls
