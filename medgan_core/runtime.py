"""Device choice and seeding without touching global state outside a ``with`` block."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from medgan_core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device = {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch, numpy and random seeded, restoring their states afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, recorded beside measured results: training results reproduce to the
    last digit on the same kind of CPU, but another one (other vector instructions, so other
    convolution kernels) rounds differently, and a GAN's training carries that difference on
    (the denoise comparison's seed 0 moved up to 0.11 dB at a site between two machines)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The Flower app (pyproject.toml with [tool.flwr.app]): what ``flwr run`` bundles and a site approves.
APP_DIR = Path(__file__).resolve().parents[1]


def flower_tool(name: str) -> str:
    """A Flower executable from this Python environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Hospitals and coordinators are offline: no telemetry, no runtime installs."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, …) by name: same environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "RAY_USAGE_STATS_ENABLED": "0"})
    env.update(extra or {})
    return env
