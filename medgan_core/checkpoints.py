"""Round checkpoints as safetensors files, written atomically.

safetensors stores named arrays without pickle (a checkpoint from another site or
coordinator cannot run code when loaded) and carries string metadata (round, task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from medgan_core.errors import MedGANError
from medgan_core.fileio import atomic_write_bytes


def save_checkpoint(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> Path:
    data = st_save(
        {name: np.ascontiguousarray(a) for name, a in arrays.items()},
        metadata={k: json.dumps(v) for k, v in metadata.items()},
    )
    return atomic_write_bytes(path, data)


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of a checkpoint; a missing or corrupt file is a MedGANError."""
    path = Path(path)
    if not path.is_file():
        raise MedGANError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    try:
        arrays = st_load(raw)
        metadata = {k: json.loads(v) for k, v in safetensors_metadata(raw).items()}
    except (SafetensorError, ValueError) as exc:
        raise MedGANError(f"checkpoint {path} is corrupt or not a safetensors file ({exc})") from exc
    return arrays, metadata


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The text metadata of a safetensors file's bytes (its JSON header's ``__metadata__``);
    ValueError where the header is not JSON."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}
