"""PNG (8- or 16-bit grey) slices, as exported by many PACS viewers and public data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medgan_core.data.volume import Volume
from medgan_core.errors import DataError


def read_png(path: str | Path, modality: str = "OT") -> Volume:
    """Read a PNG as a one-slice Volume with unit spacing; colour images are made grey."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"PNG file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "I", "I;16", "I;16B", "F"):
                image = image.convert("L")
            pixels = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable PNG image ({exc})") from exc
    # A PNG is a picture as displayed: columns run to the patient's left, rows to posterior (LPS).
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    return Volume(data=pixels.T[:, :, None].copy(), affine=affine, modality=modality, source=str(path)).canonical()


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write a 2D uint8 or uint16 array (rows, cols)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
