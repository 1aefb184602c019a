"""Paired image quality: PSNR and SSIM (scikit-image) on images in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr_ssim(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over a batch (n, 1, H, W); data range 2 (the [-1, 1] window)."""
    out = output.detach().float().cpu().clamp(-1, 1).numpy()
    ref = target.detach().float().cpu().numpy()
    psnr = [peak_signal_noise_ratio(r[0], o[0], data_range=2.0) for o, r in zip(out, ref)]
    ssim = [structural_similarity(r[0], o[0], data_range=2.0) for o, r in zip(out, ref)]
    return float(np.mean(psnr)), float(np.mean(ssim))
