"""Checks on named weight arrays, in numpy only (used by tasks, clients and strategies)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from medgan_core.errors import WeightsError


def check_arrays(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise WeightsError unless ``arrays`` has exactly the expected names and shapes and finite values."""
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise WeightsError(
            f"{source}: weight names do not match the model (missing: {missing[:5]}, unexpected: {extra[:5]})"
        )
    for name, shape in shapes.items():
        array = np.asarray(arrays[name])
        if tuple(array.shape) != tuple(shape):
            raise WeightsError(f"{source}: {name} has shape {tuple(array.shape)}, the model needs {tuple(shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise WeightsError(f"{source}: {name} has dtype {array.dtype}; weights must be floating point")
        if not np.all(np.isfinite(array)):
            raise WeightsError(f"{source}: {name} contains NaN or infinite values")


def group_of(name: str) -> str:
    """``generator.net.0.weight`` -> ``generator``."""
    return name.split(".", 1)[0]
