"""Paired image quality: PSNR and SSIM (scikit-image) on images in [-1, 1], and the same
SSIM in torch (differentiable) for training losses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_WINDOW = 7  # scikit-image's default: a uniform 7×7 window, sample covariances, K1 0.01, K2 0.03


def psnr_ssim(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over a batch (n, 1, H, W); data range 2 (the [-1, 1] window)."""
    out = output.detach().float().cpu().clamp(-1, 1).numpy()
    ref = target.detach().float().cpu().numpy()
    psnr = [peak_signal_noise_ratio(r[0], o[0], data_range=2.0) for o, r in zip(out, ref)]
    ssim = [structural_similarity(r[0], o[0], data_range=2.0) for o, r in zip(out, ref)]
    return float(np.mean(psnr)), float(np.mean(ssim))


def ssim_per_image(output: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """SSIM of each image of (n, 1, H, W), differentiable: scikit-image's
    ``structural_similarity`` with its defaults (the score the benchmarks report), so a
    loss built on it optimises exactly that score. Images need H, W ≥ 7."""
    n_pixels = SSIM_WINDOW**2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean = lambda x: F.avg_pool2d(x, SSIM_WINDOW, stride=1)  # noqa: E731  ('valid' windows, as scikit-image crops)
    mu_x, mu_y = mean(output), mean(target)
    unbiased = n_pixels / (n_pixels - 1)
    var_x = unbiased * (mean(output * output) - mu_x**2)
    var_y = unbiased * (mean(target * target) - mu_y**2)
    cov = unbiased * (mean(output * target) - mu_x * mu_y)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


#: Pixels of a CT target denser than this (HU) seed the body mask (fat is -100, lung -850).
BODY_THRESHOLD_HU = -500.0


def body_mask(target_hu: np.ndarray) -> np.ndarray:
    """Inside the patient: above ``BODY_THRESHOLD_HU``, holes (lung, bowel gas) filled."""
    return binary_fill_holes(target_hu > BODY_THRESHOLD_HU)


def ct_scores(
    output: torch.Tensor, target: torch.Tensor, ct_range: tuple[float, float], window: tuple[float, float]
) -> dict[str, list[float]]:
    """Per-slice scores of CT images on the whole-range scale (``ct_range`` mapped to [-1, 1]):
    ``psnr`` over the whole range (its span is the data range), ``psnr-window`` and ``ssim``
    in the soft-tissue ``window`` (what a radiologist reads), ``mae-hu`` inside the body."""
    low, high = ct_range
    to_hu = lambda x: (x.detach().float().cpu().numpy()[:, 0] + 1.0) / 2.0 * (high - low) + low  # noqa: E731
    out_hu, ref_hu = to_hu(output.clamp(-1, 1)), to_hu(target)
    span = window[1] - window[0]
    scores: dict[str, list[float]] = {"psnr": [], "psnr-window": [], "ssim": [], "mae-hu": []}
    for o, r in zip(out_hu, ref_hu):
        ow, rw = np.clip(o, *window), np.clip(r, *window)
        with np.errstate(divide="ignore"):  # identical images: an infinite PSNR, not a warning
            scores["psnr"].append(peak_signal_noise_ratio(r, o, data_range=high - low))
            scores["psnr-window"].append(peak_signal_noise_ratio(rw, ow, data_range=span))
        scores["ssim"].append(structural_similarity(rw, ow, data_range=span))
        inside = body_mask(r)
        scores["mae-hu"].append(float(np.abs(o - r)[inside].mean()) if inside.any() else 0.0)
    return scores
