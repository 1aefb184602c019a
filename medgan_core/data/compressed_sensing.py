"""Total-variation compressed-sensing MR reconstruction (the classical method the recon
GAN is measured against, and with ``task.tv-start`` the image it starts from).

FISTA on ½‖M F x − y‖² + λ TV(x) over a real image x, with scikit-image's Chambolle TV
denoiser as the proximal step: a well-kept, tested TV solver, called slice by slice. It
reads the recon network's input channels (zero-filled real and imaginary parts and the
sampling mask, in the scaling of ``medgan_core.data.kspace``), so it needs nothing but the
measurement; λ is in units of that scaling's [0, 1] intensity. Each slice's result depends
on that slice's own k-space only, so under DP it is a per-record preprocessing step.
"""

from __future__ import annotations

import numpy as np

TV_ITERATIONS = 30  # FISTA steps (each a Chambolle TV solve of up to 50 iterations)
MAX_TV_WEIGHT = 1.0  # far above any useful λ (the benchmark tunes 0.002-0.02)


def tv_reconstruction(inputs: np.ndarray, lam: float, iterations: int = TV_ITERATIONS) -> np.ndarray:
    """(n, ≥3, H, W) recon inputs -> (n, 1, H, W) float32 TV-CS magnitude images in the network's
    [-1, 1] scaling. The mask selects columns, so a strip of whole rows is its own problem,
    but TV couples rows: give whole slices."""
    # Imported here: skimage.restoration pulls in scipy.stats (about 0.7 s), and every site
    # process imports this module through the data loader, most never running recon.
    from skimage.restoration import denoise_tv_chambolle

    out = []
    for x in np.asarray(inputs, dtype=np.float64):
        zero_filled = (x[0] + 1) / 2 + 1j * x[1] / 2
        mask = x[2] > 0.5
        measured = np.fft.fft2(zero_filled, norm="ortho") * mask
        estimate = previous = np.abs(zero_filled)
        step, point = 1.0, estimate
        for _ in range(iterations):
            residual = np.fft.fft2(point, norm="ortho") * mask - measured
            gradient = np.fft.ifft2(residual * mask, norm="ortho").real
            estimate = denoise_tv_chambolle(point - gradient, weight=lam, max_num_iter=50)
            next_step = (1 + np.sqrt(1 + 4 * step**2)) / 2
            point = estimate + (step - 1) / next_step * (estimate - previous)
            previous, step = estimate, next_step
        out.append(2 * np.clip(estimate, 0, None) - 1)
    if not out:
        return np.zeros((0, 1, *np.shape(inputs)[-2:]), dtype=np.float32)
    return np.stack(out)[:, None].astype(np.float32)
