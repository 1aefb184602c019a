"""Tissue labels of a label map (modality ``SEG``), and what is read from them.

The simulator writes these labels and the readers and datasets read them; neither needs
the other, so both import this small module.
"""

from __future__ import annotations

import numpy as np

AIR, FAT, SOFT, LIVER, KIDNEY, AORTA, CANCELLOUS, CORTICAL, CANAL, GAS, LESION = range(11)


def lesion_burden(labels: np.ndarray) -> np.ndarray:
    """Per slice of a (k, rows, cols) label volume: the fraction of the liver that is lesion,
    in [0, 1] (0 where a slice shows no lesion). The severity score conditional synthesis uses."""
    lesion = (labels == LESION).sum(axis=(1, 2)).astype(np.float32)
    liver = (labels == LIVER).sum(axis=(1, 2)).astype(np.float32)
    return np.where(lesion > 0, lesion / np.maximum(lesion + liver, 1.0), 0.0).astype(np.float32)
