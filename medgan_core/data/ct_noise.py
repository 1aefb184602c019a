"""CT image formation in the image domain: filtered back-projection's blur and noise at
clinical matrix sizes, without projecting and back-projecting every slice.

FBP is linear, so a reconstruction is the noise-free image through the kernel plus the
back-projected quantum noise. Both are made here directly:

* the noise-free image is the anatomy filtered by the kernel's apodisation window
  ``W(ρ)`` (the ramp cancels back-projection's 1/ρ blur) and by the linear interpolation
  of back-projection, band-limited at the detector's Nyquist frequency;
* the noise is Gaussian noise with FBP's noise power spectrum, ρ·W(ρ)²·sinc⁴ (its texture:
  fine-grained for a sharp kernel, blotchy for a smooth one), scaled at each pixel by
  the square root of the mean over views of 1/photons reaching the detector along the
  rays through it (exp(line integral) / photons: more noise behind bone and in the
  middle of a large patient), taken from a coarse projection of the same anatomy.

Its noise level is calibrated against a full projection simulation
(``medgan_core.data.simulate.ct_acquire_scanners``: Radon transform, Poisson counts,
scikit-image's FBP) at the reference geometry, 128 pixels over 400 mm; a test checks the
two agree per kernel. At finer pixels the noise grows as √(reference pixel / pixel),
the scanner taking proportionally more views. A slice at 512×512 costs a few FFTs
(about 0.05 s) where projecting it costs seconds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import fft
from scipy.ndimage import zoom
from skimage.transform import iradon, radon

MU_WATER_PER_MM = 0.0193  # linear attenuation of water at ~70 keV
REFERENCE_PIXEL_MM = 400.0 / 128  # where the noise level is calibrated against projections
#: Noise std (HU) per √(mean 1/photons) of each FBP kernel at the reference geometry,
#: fitted to scikit-image's FBP of 180 views (``tests/test_ct_noise.py`` re-measures it).
KERNEL_GAIN = {"ramp": 776.0, "shepp-logan": 614.0, "cosine": 401.0, "hamming": 317.0, "hann": 291.0}
COARSE = 64  # the grid the attenuation along rays is projected on
COARSE_VIEWS = 60


def apodisation(kernel: str, rho: np.ndarray) -> np.ndarray:
    """The kernel's window over radial frequency ``rho`` (1 = the detector's Nyquist), as
    scikit-image's FBP filters define it; zero past Nyquist."""
    if kernel == "ramp":
        window = np.ones_like(rho)
    elif kernel == "shepp-logan":
        window = np.sinc(rho / 2)
    elif kernel == "cosine":
        window = np.cos(np.pi * rho / 2)
    elif kernel == "hamming":
        window = 0.54 + 0.46 * np.cos(np.pi * rho)
    elif kernel == "hann":
        window = 0.5 + 0.5 * np.cos(np.pi * rho)
    else:
        raise ValueError(f"unknown FBP kernel {kernel!r}; choose one of {', '.join(KERNEL_GAIN)}")
    return np.where(rho <= 1.0, window, 0.0)


def radial_frequency(shape: tuple[int, int]) -> np.ndarray:
    """|frequency| of a 2D FFT grid, 1 at Nyquist (0.5 cycles per pixel)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.sqrt(fx**2 + fy**2) / 0.5


def mean_inverse_counts(mu_per_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Mean over views of exp(line integral through each pixel): the relative variance of
    the photon counts along the rays that cross it (times 1/photons)."""
    size = mu_per_mm.shape[0]
    if size % COARSE == 0:  # block means: what a coarser detector would integrate, and cheap
        factor = size // COARSE
        coarse = mu_per_mm.reshape(COARSE, factor, COARSE, factor).mean(axis=(1, 3))
    else:
        coarse = zoom(mu_per_mm, COARSE / size, order=1)
    coarse_mm = pixel_mm * size / COARSE
    angles = np.linspace(0.0, 180.0, COARSE_VIEWS, endpoint=False)
    sinogram = np.exp(radon(coarse, angles, circle=True) * coarse_mm)
    spread = iradon(sinogram, angles, circle=True, filter_name=None)
    norm = back_projected_ones(sinogram.shape)
    ratio = np.where(norm > 0, spread / np.maximum(norm, 1e-12), 1.0)
    # a smooth map: PIL's bilinear resize (half-pixel centres, as scipy's grid mode) costs a fifth of scipy's zoom
    fine = np.asarray(Image.fromarray(ratio.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    return np.maximum(fine, 1.0)


@lru_cache(maxsize=4)
def back_projected_ones(shape: tuple[int, int]) -> np.ndarray:
    """The unfiltered back-projection of a sinogram of ones over ``COARSE_VIEWS`` views: how
    many rays reach each pixel, the same for every slice; read-only."""
    angles = np.linspace(0.0, 180.0, shape[1], endpoint=False)
    norm = iradon(np.ones(shape), angles, circle=True, filter_name=None)
    norm.setflags(write=False)
    return norm


@lru_cache(maxsize=8)
def outside_scan_circle(size: int) -> np.ndarray:
    """Pixels of a size×size slice outside the reconstructed circle (air, -1000 HU); read-only."""
    yy, xx = np.mgrid[:size, :size]
    outside = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 > ((size - 1) / 2) ** 2
    outside.setflags(write=False)
    return outside


@lru_cache(maxsize=16)
def kernel_filters(kernel: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(apodisation window, √NPS shape) of a kernel on the rfft grid of ``shape``; read-only."""
    rho = radial_frequency(shape)
    # back-projection interpolates the filtered projections linearly: a further sinc² blur
    window = (apodisation(kernel, rho) * np.sinc(rho / 2) ** 2).astype(np.float32)
    shaping = np.sqrt(rho * window.astype(np.float64) ** 2).astype(np.float32)
    for array in (window, shaping):
        array.setflags(write=False)
    return window, shaping


def fbp_images(
    hu: np.ndarray, kernels: list[str], photons: list[float], pixel_mm: float, rng: np.random.Generator,
    correlated: list[int] | None = None,
) -> list[np.ndarray]:
    """One (rows, cols) slice as each scanner reconstructs it (HU, before calibration errors):
    the kernel's blur and its noise at ``photons`` per detector bin.

    ``correlated[i] = j`` makes scanner i's noise scanner j's plus independent noise (the
    same projections at a lower dose, as a reduced-dose series of one acquisition is);
    j must come earlier, have the same kernel and at least as many photons."""
    outside = outside_scan_circle(hu.shape[0])
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0, None)
    mu[outside] = 0.0
    inverse = mean_inverse_counts(mu, pixel_mm)
    spectrum = fft.rfft2(np.where(outside, -1000.0, hu).astype(np.float32))
    finer = np.sqrt(REFERENCE_PIXEL_MM / pixel_mm)
    filters = {kernel: kernel_filters(kernel, hu.shape) for kernel in set(kernels)}
    blurred = {kernel: fft.irfft2(spectrum * window, s=hu.shape) for kernel, (window, _) in filters.items()}
    images: list[np.ndarray] = []
    unit_noise: list[np.ndarray] = []
    for index, (kernel, count) in enumerate(zip(kernels, photons)):
        # white noise drawn as its spectrum (complex Gaussian), shaped by the NPS, one inverse FFT
        shaping = filters[kernel][1]
        draw = rng.standard_normal((2, *shaping.shape), dtype=np.float32)
        white = fft.irfft2((draw[0] + 1j * draw[1]) * shaping, s=hu.shape)
        white /= white.std() + 1e-12
        source = None if correlated is None else correlated[index]
        if source is not None and source >= 0:
            earlier, earlier_count = unit_noise[source], photons[source]
            share = np.sqrt(min(1.0, count / earlier_count))  # the lower dose keeps its part of the same noise
            white = share * earlier + np.sqrt(1 - share**2) * white
        unit_noise.append(white)
        sigma = (KERNEL_GAIN[kernel] * finer / np.sqrt(count)) * np.sqrt(inverse)
        image = blurred[kernel] + sigma * white
        image[outside] = -1000.0
        images.append(image.astype(np.float32, copy=False))
    return images
