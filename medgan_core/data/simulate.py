"""Physics-based multi-site phantom studies, written as real DICOM and NIfTI files.

Each subject is an anatomy-like abdominal label volume (body with subcutaneous fat,
muscle, liver, kidneys, aorta, spine, bowel gas, graded liver lesions) drawn from a
seeded random model. The same anatomy is imaged by CT (two scanners) and MR:

* CT: tissue HU -> linear attenuation -> parallel-beam projections (Radon transform)
  -> Poisson photon counts at the site's tube dose -> filtered back-projection with the
  site's reconstruction kernel -> HU with the site's calibration offset. The same
  projections at a quarter of the dose give a paired low-dose series (denoising), and
  the full-dose image averaged over 2×2 and 4×4 detector-sized blocks gives paired
  low-resolution series on a coarser grid (super-resolution).
* A second CT scanner at every site (the same older model everywhere: lower dose,
  another kernel, reading too high by 25-60 HU with a 3-14 % gain error — how much and
  with which kernel differs per site) reconstructs the same projections: the
  ``-scanner-b`` series, for unpaired harmonisation (CycleGAN). Training uses disjoint
  subjects for the two scanners, so no pair is ever seen; the held-out split can be
  scored against the same subject's scanner-A image.
* Ground-truth tissue labels are written as a segmentation NIfTI per subject (liver,
  kidneys, lesions, …), from which a slice's lesion burden — the severity that
  conditional synthesis is conditioned on — is computed.
* MR: tissue proton density, T1, T2 -> spin-echo signal at the site's TR/TE -> smooth
  multiplicative bias field -> Rician noise -> scanner gain. Its k-space, undersampled
  with the site's own Cartesian sampling pattern at 4× and 10× acceleration, is written
  as raw data for compressed-sensing reconstruction.

Sites differ the way hospitals do (dose, kernel, calibration, MR contrast, bias field,
noise, patient size, lesion prevalence and severity, second scanner), so a study
simulated here is non-IID.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.transform import iradon, radon

from medgan_core.data.dataset import (
    DataSpec,
    DegradedPairs,
    KSpacePairs,
    ModalityPairs,
    SlicesWithBurden,
    UnpairedDomains,
)
from medgan_core.data.ct_noise import MU_WATER_PER_MM, fbp_images, outside_scan_circle
from medgan_core.data.dicom_io import write_dicom_series
from medgan_core.data.kspace import ACCELERATIONS
from medgan_core.data.labels import (  # noqa: F401  (re-exported: the simulator's label names)
    AIR,
    AORTA,
    CANAL,
    CANCELLOUS,
    CORTICAL,
    FAT,
    GAS,
    KIDNEY,
    LESION,
    LIVER,
    SOFT,
)
from medgan_core.data.kspace import crop_kspace, sampling_mask, undersample, write_kspace
from medgan_core.data.manifest import LOW_DOSE, SCANNER_B, SEGMENTATION, ManifestEntry, write_manifest
from medgan_core.data.nifti_io import write_nifti
from medgan_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from medgan_core.config import TaskConfig

# Tissue table: label -> (HU, proton density, T1 ms, T2 ms) at 1.5 T (labels: medgan_core.data.labels).
TISSUES: dict[int, tuple[float, float, float, float]] = {
    AIR: (-1000.0, 0.0, 1.0, 1.0),
    FAT: (-100.0, 1.0, 260.0, 85.0),
    SOFT: (40.0, 0.8, 870.0, 47.0),
    LIVER: (60.0, 0.75, 490.0, 43.0),
    KIDNEY: (30.0, 0.9, 650.0, 58.0),
    AORTA: (45.0, 0.9, 1200.0, 120.0),
    CANCELLOUS: (300.0, 0.6, 550.0, 50.0),
    CORTICAL: (1000.0, 0.05, 1000.0, 1.0),
    CANAL: (15.0, 1.0, 2500.0, 250.0),
    GAS: (-900.0, 0.0, 1.0, 1.0),
    LESION: (25.0, 0.9, 1100.0, 110.0),
}
LOW_DOSE_FRACTION = 0.25  # quarter dose, as in the AAPM low-dose CT challenge
LOW_RES_SCALES = (2, 4)  # paired low-resolution series for super-resolution
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test by subject
FIELD_OF_VIEW_MM = 400.0  # every simulated slice spans this; the matrix sets the pixel size


@dataclass(frozen=True)
class SiteProfile:
    """What makes one hospital's images differ from another's."""

    name: str
    ct_photons: float  # unattenuated photons per detector bin: the dose
    ct_kernel: str  # FBP filter: ramp (sharp) .. hann (smooth)
    ct_offset_hu: float  # calibration offset
    mr_tr_ms: float
    mr_te_ms: float
    mr_gain: float
    mr_bias: float  # amplitude of the multiplicative bias field
    mr_noise: float  # Rician noise sigma relative to PD=1 signal
    body_scale: float  # patient size
    lesion_rate: float  # fraction of subjects with a liver lesion
    mr_center_fraction: float = 0.08  # fully sampled k-space centre of its accelerated protocols
    lesion_severity: float = 0.5  # mean severity (0..1) of its lesions: size and number
    # The site's second CT scanner (series '-scanner-b'): dose relative to the main one,
    # kernel, calibration offset and gain error.
    scanner_b_dose: float = 0.3
    scanner_b_kernel: str = "hann"
    scanner_b_offset_hu: float = 40.0
    scanner_b_gain: float = 1.1

    def scanners(self, dose_a: tuple[float, ...] = (1.0,)) -> list["CTScanner"]:
        """The main scanner at each of ``dose_a``, then scanner B."""
        main = [CTScanner(self.ct_photons * d, self.ct_kernel, self.ct_offset_hu) for d in dose_a]
        second = CTScanner(self.ct_photons * self.scanner_b_dose, self.scanner_b_kernel,
                           self.ct_offset_hu + self.scanner_b_offset_hu, self.scanner_b_gain)
        return main + [second]


@dataclass(frozen=True)
class CTScanner:
    """One CT acquisition protocol: dose, FBP kernel, calibration offset, HU gain error."""

    photons: float
    kernel: str
    offset_hu: float = 0.0
    gain: float = 1.0


DEFAULT_SITES = (
    SiteProfile("hospital-a", 1e6, "ramp", 0.0, 500.0, 12.0, 1000.0, 0.10, 0.010, 1.00, 0.3, 0.08,
                lesion_severity=0.4, scanner_b_dose=0.25, scanner_b_kernel="hann", scanner_b_offset_hu=45.0,
                scanner_b_gain=1.12),
    SiteProfile("hospital-b", 2.5e5, "hann", 20.0, 650.0, 20.0, 700.0, 0.35, 0.030, 0.92, 0.5, 0.04,
                lesion_severity=0.7, scanner_b_dose=0.5, scanner_b_kernel="ramp", scanner_b_offset_hu=35.0,
                scanner_b_gain=1.08),
    SiteProfile("hospital-c", 6e4, "shepp-logan", -15.0, 420.0, 9.0, 1500.0, 0.22, 0.020, 1.08, 0.2, 0.06,
                lesion_severity=0.5, scanner_b_dose=0.6, scanner_b_kernel="cosine", scanner_b_offset_hu=55.0,
                scanner_b_gain=1.1),
)


def site_profiles(n_sites: int, seed: int = 0) -> list[SiteProfile]:
    """The three reference hospitals, then random ones drawn from the same ranges."""
    if n_sites < 1:
        raise ConfigError(f"--sites = {n_sites}; simulate at least one site")
    profiles = list(DEFAULT_SITES[:n_sites])
    rng = np.random.default_rng(seed + 1000)
    kernels = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
    for index in range(len(profiles), n_sites):
        profiles.append(
            SiteProfile(
                name=f"hospital-{chr(ord('a') + index) if index < 26 else index}",
                ct_photons=float(10 ** rng.uniform(4.6, 6.0)),
                ct_kernel=str(rng.choice(kernels)),
                ct_offset_hu=float(rng.uniform(-25, 25)),
                mr_tr_ms=float(rng.uniform(400, 700)),
                mr_te_ms=float(rng.uniform(8, 22)),
                mr_gain=float(rng.uniform(600, 1600)),
                mr_bias=float(rng.uniform(0.05, 0.4)),
                mr_noise=float(rng.uniform(0.008, 0.035)),
                body_scale=float(rng.uniform(0.9, 1.1)),
                lesion_rate=float(rng.uniform(0.1, 0.6)),
                mr_center_fraction=float(rng.uniform(0.04, 0.1)),
                lesion_severity=float(rng.uniform(0.3, 0.8)),
                scanner_b_dose=float(rng.uniform(0.2, 0.7)),
                scanner_b_kernel=str(rng.choice(kernels)),
                scanner_b_offset_hu=float(rng.uniform(25, 60)),
                scanner_b_gain=float(rng.uniform(1.03, 1.14)),
            )
        )
    return profiles


# --- anatomy ------------------------------------------------------------------------
def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    """Pixels of the grid (``x``, ``y``: a meshgrid of ascending coordinates) inside the
    ellipse. Only the square around it is tested (every pixel inside is within the longer
    semi-axis of the centre, one pixel of margin kept for rounding): an organ is a small part
    of a 512 slice, and this is the simulator's most frequent call."""
    reach = max(ax, ay)
    cols, rows = x[0], y[:, 0]
    c0, c1 = np.searchsorted(cols, cx - reach) - 1, np.searchsorted(cols, cx + reach, side="right") + 1
    r0, r1 = np.searchsorted(rows, cy - reach) - 1, np.searchsorted(rows, cy + reach, side="right") + 1
    box = (slice(max(r0, 0), max(r1, 0)), slice(max(c0, 0), max(c1, 0)))
    c, s = np.cos(angle), np.sin(angle)
    u = (x[box] - cx) * c + (y[box] - cy) * s
    v = -(x[box] - cx) * s + (y[box] - cy) * c
    inside = np.zeros(x.shape, dtype=bool)
    inside[box] = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
    return inside


def phantom_labels(rng: np.random.Generator, size: int, n_slices: int, body_scale: float, severity: float) -> np.ndarray:
    """A (k, rows, cols) tissue-label volume of one abdominal subject.

    Coordinates run from -1 to 1 across the field of view; rows grow posterior.
    Organs change size along the slices the way they do from upper to lower abdomen.
    ``severity`` in [0, 1] grades liver disease: 0 none; higher means more and larger
    (roughly spherical) lesions, so a slice's lesion burden ranges from a small focus to a
    large part of the liver.
    """
    lin = np.linspace(-1, 1, size)
    x, y = np.meshgrid(lin, lin)
    scale = body_scale * rng.uniform(0.93, 1.05)
    body_a, body_b = 0.80 * scale, 0.60 * scale * rng.uniform(0.92, 1.08)
    fat = rng.uniform(0.05, 0.12)
    liver_c = (-0.33 + rng.uniform(-0.04, 0.04), -0.08 + rng.uniform(-0.04, 0.04))
    liver_ax = (0.30 * rng.uniform(0.9, 1.1), 0.27 * rng.uniform(0.9, 1.1))
    liver_angle = rng.uniform(-0.4, 0.1)
    kidney_dx, kidney_y = rng.uniform(0.25, 0.33), rng.uniform(0.22, 0.3)
    gas_blobs = [(rng.uniform(-0.1, 0.45), rng.uniform(-0.35, 0.1), rng.uniform(0.03, 0.07)) for _ in range(4)]
    lesions = _lesions(rng, severity, liver_c, n_slices)

    volume = np.zeros((n_slices, size, size), dtype=np.uint8)
    for k in range(n_slices):
        t = k / max(n_slices - 1, 1)  # 0 = upper abdomen, 1 = lower
        sl = volume[k]
        sl[_ellipse(x, y, 0, 0.02, body_a, body_b)] = FAT
        sl[_ellipse(x, y, 0, 0.02, body_a - fat, body_b - fat)] = SOFT
        liver_scale = 1.0 - 0.75 * t
        if liver_scale > 0.3:
            liver = _ellipse(x, y, *liver_c, liver_ax[0] * liver_scale, liver_ax[1] * liver_scale, liver_angle)
            sl[liver] = LIVER
            for lx, ly, radius, centre, half_height in lesions:
                r_slice = radius * np.sqrt(max(0.0, 1.0 - ((k - centre) / half_height) ** 2))
                if r_slice > 0.01:
                    sl[liver & _ellipse(x, y, lx, ly, r_slice, r_slice)] = LESION
        kidney_scale = np.sin(np.pi * np.clip((t - 0.25) / 0.6, 0, 1))
        if kidney_scale > 0.2:
            for side in (-1, 1):
                sl[_ellipse(x, y, side * kidney_dx, kidney_y, 0.08 * kidney_scale, 0.12 * kidney_scale, side * 0.4)] = KIDNEY
        for gx, gy, gr in gas_blobs:
            if rng.random() < 0.6:
                sl[_ellipse(x, y, gx, gy + 0.3 * t, gr, gr * 0.8) & (sl == SOFT)] = GAS
        sl[_ellipse(x, y, 0.06, 0.30, 0.045, 0.045)] = AORTA
        spine_y = body_b * 0.72
        sl[_ellipse(x, y, 0, spine_y, 0.11, 0.09)] = CORTICAL
        sl[_ellipse(x, y, 0, spine_y, 0.085, 0.068)] = CANCELLOUS
        sl[_ellipse(x, y, 0, spine_y + 0.14, 0.04, 0.035)] = CANAL
        sl[_ellipse(x, y, 0, spine_y + 0.14, 0.065, 0.06) & (sl == SOFT)] = CORTICAL
    return volume


def _lesions(
    rng: np.random.Generator, severity: float, liver_c: tuple[float, float], n_slices: int
) -> list[tuple[float, float, float, float, float]]:
    """(x, y, radius, centre slice, half height in slices) of each lesion of a subject."""
    if severity <= 0:
        return []
    count = 1 + int(severity > 0.45) + int(severity > 0.8)
    lesions = []
    for _ in range(count):
        radius = (0.03 + 0.09 * severity) * rng.uniform(0.8, 1.2)
        centre = rng.uniform(0.0, 0.45) * max(n_slices - 1, 1)  # the liver fills the upper slices
        half_height = max(1.0, radius / 0.15 * n_slices / 2)
        lesions.append((liver_c[0] + rng.uniform(-0.12, 0.12), liver_c[1] + rng.uniform(-0.1, 0.1),
                        radius, centre, half_height))
    return lesions


def tissue_hu(labels: np.ndarray, texture: np.ndarray | None = None) -> np.ndarray:
    """Hounsfield units of a label volume, with ±8 HU tissue texture where ``texture`` is given."""
    hu = np.zeros(labels.shape, np.float32)
    for label, (value, *_rest) in TISSUES.items():
        hu[labels == label] = value
    if texture is not None:
        hu += np.where(labels == AIR, 0.0, 8.0 * texture)  # in place: stays float32
    return hu


def tissue_texture(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """``_texture`` with the same grain in mm at any matrix (that of 1.5 pixels at 128 over the
    field of view), drawn on a 128-pixel grid and interpolated: a 3D blur at 512 costs seconds."""
    k, rows, cols = shape
    factor = max(1, rows // 128)
    coarse = _texture(rng, (k, -(-rows // factor), -(-cols // factor)), sigma=1.5 * rows / (128 * factor))
    if factor == 1:
        return coarse
    # PIL's bilinear resize of each slice: scipy's zoom with grid_mode (half-pixel centres, edges
    # held), equal to 1e-6, at a fifth of its time (the largest single cost of a 512 subject)
    size = (coarse.shape[2] * factor, coarse.shape[1] * factor)
    fine = np.stack([np.asarray(Image.fromarray(plane.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
                     for plane in coarse])[:, :rows, :cols]
    return (fine / (fine.std(dtype=np.float64) + 1e-8)).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth zero-mean tissue texture, unit std."""
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


# --- imaging physics -----------------------------------------------------------------
def ct_acquire(
    hu: np.ndarray, profile: SiteProfile, pixel_mm: float, rng: np.random.Generator, dose: float = 1.0
) -> np.ndarray:
    """CT of one (rows, cols) slice at ``dose`` × the site's dose: Poisson noise on the sinogram, FBP."""
    return ct_acquire_doses(hu, profile, pixel_mm, rng, (dose,))[0]


def ct_acquire_doses(
    hu: np.ndarray, profile: SiteProfile, pixel_mm: float, rng: np.random.Generator, doses: tuple[float, ...]
) -> list[np.ndarray]:
    """One projection of the anatomy, reconstructed at several doses (paired low/full dose)."""
    return ct_acquire_scanners(hu, profile.scanners(doses)[:-1], pixel_mm, rng)


def ct_acquire_scanners(
    hu: np.ndarray, scanners: list[CTScanner], pixel_mm: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The same anatomy as each scanner reconstructs it: its own dose (quantum noise with
    FBP's texture), kernel, calibration offset and gain (``medgan_core.data.ct_noise``, the
    image-domain model of ``ct_project_scanners``). A scanner with the kernel of an earlier
    one and fewer photons is a reduced-dose series of that acquisition: its noise contains
    the earlier one's. The same scanner named twice is a re-scan: independent noise."""
    kernels = [s.kernel for s in scanners]
    photons = [s.photons for s in scanners]
    correlated = [next((j for j in range(i) if kernels[j] == kernels[i] and photons[j] > photons[i]
                        and scanners[j].gain == scanners[i].gain), -1) for i in range(len(scanners))]
    images = fbp_images(hu, kernels, photons, pixel_mm, rng, correlated)
    outside = outside_scan_circle(hu.shape[0])
    return [np.clip(np.where(outside, -1000.0, image * scanner.gain + scanner.offset_hu), -1024.0, 3071.0)
            .astype(np.float32) for image, scanner in zip(images, scanners)]


def ct_project_scanners(
    hu: np.ndarray, scanners: list[CTScanner], pixel_mm: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The reference physics the image-domain model is calibrated on (seconds a slice at
    512×512): line integrals by the Radon transform, Poisson photon counts at each
    scanner's dose, FBP with its kernel, its calibration offset and gain."""
    size = hu.shape[0]
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0, None)
    yy, xx = np.mgrid[:size, :size]
    outside = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 > ((size - 1) / 2) ** 2
    mu[outside] = 0.0
    angles = np.linspace(0.0, 180.0, 180, endpoint=False)
    line_integrals = radon(mu, angles, circle=True) * pixel_mm
    images = []
    for scanner in scanners:
        counts = rng.poisson(scanner.photons * np.exp(-line_integrals))
        measured = -np.log(np.maximum(counts, 1) / scanner.photons)
        mu_rec = iradon(measured / pixel_mm, angles, circle=True, filter_name=scanner.kernel)
        hu_rec = (mu_rec / MU_WATER_PER_MM - 1.0) * 1000.0 * scanner.gain + scanner.offset_hu
        hu_rec[outside] = -1000.0
        images.append(np.clip(hu_rec, -1024.0, 3071.0).astype(np.float32))
    return images


def coarse_grid(slices: np.ndarray, scale: int) -> np.ndarray:
    """(n, rows, cols) -> (n, rows/scale, cols/scale): each pixel the mean of a scale×scale
    block, as a detector with scale-times larger elements integrates the same signal."""
    n, rows, cols = slices.shape
    if rows % scale or cols % scale:
        raise ConfigError(f"a {rows}×{cols} image cannot be put on a {scale}× coarser grid")
    return slices.reshape(n, rows // scale, scale, cols // scale, scale).mean(axis=(2, 4)).astype(np.float32)


def mr_acquire(labels: np.ndarray, texture: np.ndarray, profile: SiteProfile, rng: np.random.Generator,
               matrix: int | None = None) -> np.ndarray:
    """Spin-echo MR of a label volume with bias field and Rician noise, on a ``matrix`` ×
    ``matrix`` grid over the labels' field of view (default: the labels' own). A matrix that
    divides the labels' integrates blocks of pixels (``coarse_grid``); any other keeps the
    central k-space of the complex image before its magnitude is taken, as a scanner that
    acquires that matrix does (``crop_kspace``, centred)."""
    pd, t1, t2 = (np.zeros(labels.shape, np.float32) for _ in range(3))
    for label, (_, p, r1, r2) in TISSUES.items():
        mask = labels == label
        pd[mask], t1[mask], t2[mask] = p, r1, r2
    pd = pd * (1.0 + 0.04 * texture) * (labels != AIR)
    signal = pd * (1 - np.exp(-profile.mr_tr_ms / t1)) * np.exp(-profile.mr_te_ms / t2)
    k, rows, cols = labels.shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, k), np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    c = rng.uniform(-1, 1, size=4)
    bias = np.exp(profile.mr_bias * (c[0] * xx + c[1] * yy + 0.5 * c[2] * zz + c[3] * xx * yy))
    signal = signal * bias
    noise_re = rng.normal(0, profile.mr_noise, labels.shape)
    noise_im = rng.normal(0, profile.mr_noise, labels.shape)
    matrix = matrix or cols
    if cols % matrix == 0:
        magnitude = np.sqrt((signal + noise_re) ** 2 + noise_im**2)
        return coarse_grid((magnitude * profile.mr_gain).astype(np.float32), cols // matrix)
    magnitude = np.abs(crop_kspace((signal + noise_re) + 1j * noise_im, matrix, centred=True))
    return (magnitude * profile.mr_gain).astype(np.float32)


# --- study ---------------------------------------------------------------------------
#: Series groups a simulated site can hold (``simulate_site(series=...)``): the main CT,
#: its quarter dose, its 2×/4× coarser grids, the second scanner, MR, MR k-space, labels.
SERIES = ("ct", "ct-low-dose", "ct-low-res", "ct-scanner-b", "mr", "mr-kspace", "seg")
#: MR's matrix over the 400 mm field of view: 384 pixels are 1.04 mm, about the 1 mm of a
#: clinical body MR, on a coarser grid than CT's 0.78 mm (a smaller CT matrix caps it).
#: Format-2 studies were written at 256 (1.56 mm), as the translate and recon benchmarks still are.
MR_MATRIX = 384


def mr_matrix_for(size: int, mr_matrix: int = MR_MATRIX) -> int:
    """The MR matrix of a site simulated at CT matrix ``size``: ``mr_matrix``, at most ``size``."""
    if mr_matrix < 32 or mr_matrix % 4:
        raise ConfigError(f"MR matrix {mr_matrix}: need a multiple of 4, at least 32")
    return min(size, mr_matrix)


def check_series(series: tuple[str, ...]) -> None:
    """Refuse an unknown or empty choice of series groups (ConfigError naming them)."""
    unknown = sorted(set(series) - set(SERIES))
    if unknown or not series:
        raise ConfigError(f"series {', '.join(unknown) or '(none)'}; choose from {', '.join(SERIES)}")


def series_for(spec: DataSpec, modality: str) -> tuple[str, ...]:
    """The series groups a task reading ``spec`` of ``modality`` needs from a simulated site."""
    own = "ct" if modality == "CT" else "mr"
    match spec:
        case SlicesWithBurden():
            return (own, "seg")
        case DegradedPairs(variant="low-dose"):
            return ("ct", "ct-low-dose")
        case DegradedPairs():
            return ("ct", "ct-low-res")
        case KSpacePairs():
            return ("mr", "mr-kspace")
        case ModalityPairs():
            return ("ct", "mr")
        case UnpairedDomains():
            return ("ct", "ct-scanner-b", "seg")
    return (own,)


def simulate_site(
    profile: SiteProfile,
    out_dir: str | Path,
    *,
    n_subjects: int = 10,
    n_slices: int = 16,
    size: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    series: tuple[str, ...] = SERIES,
    mr_matrix: int = MR_MATRIX,
) -> Path:
    """Write one hospital: per subject CT DICOM series (full and quarter dose, 2×/4× coarser
    grids, second scanner), MR NIfTI (``mr_matrix`` pixels across, at most ``size``) and its
    undersampled k-space, a label map; and manifest.csv. ``series`` picks which groups
    (``SERIES``) are written: a study for one task needs only what that task reads. The
    field of view is 400 mm, so 512 pixels are 0.78 mm, as in abdominal CT. Each subject
    draws from its own seeded stream (``simulate_subject``), so subjects may be written in
    any order or in parallel with the same result."""
    check_site_settings(n_subjects, n_slices, size, series)
    mr_matrix_for(size, mr_matrix)
    entries = []
    for s in range(n_subjects):
        entries += simulate_subject(profile, out_dir, s, n_subjects=n_subjects, n_slices=n_slices, size=size,
                                    seed=seed, series=series, mr_matrix=mr_matrix)
        if progress:
            progress(f"{profile.name}: subject {s + 1}/{n_subjects}")
    return finish_site(profile, out_dir, entries)


def check_site_settings(n_subjects: int, n_slices: int, size: int, series: tuple[str, ...]) -> None:
    if n_subjects < 3:
        raise ConfigError(f"subjects = {n_subjects}; a site needs at least 3 (train, val and test)")
    if size < 32 or n_slices < 1 or size % max(LOW_RES_SCALES):
        raise ConfigError(
            f"size = {size}, slices = {n_slices}; need a size >= 32 divisible by {max(LOW_RES_SCALES)} "
            "(for the low-resolution series) and at least one slice"
        )
    check_series(series)


def finish_site(profile: SiteProfile, out_dir: str | Path, entries: list[ManifestEntry]) -> Path:
    """The site's manifest.csv and site.json, once every subject is written."""
    out_dir = Path(out_dir)
    write_manifest(entries, out_dir / "manifest.csv")
    (out_dir / "site.json").write_text(json.dumps(asdict(profile), indent=2))
    return out_dir


def simulate_subject(
    profile: SiteProfile, out_dir: str | Path, s: int, *, n_subjects: int, n_slices: int, size: int, seed: int,
    series: tuple[str, ...], mr_matrix: int = MR_MATRIX,
) -> list[ManifestEntry]:
    """Write subject ``s`` of a site; its manifest entries."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, s])
    pixel_mm, slice_mm = FIELD_OF_VIEW_MM / size, 5.0
    mr_size = mr_matrix_for(size, mr_matrix)
    mr_pixel_mm = FIELD_OF_VIEW_MM / mr_size
    n_train = max(1, round(n_subjects * SPLIT_FRACTIONS[0]))
    n_val = max(1, round(n_subjects * SPLIT_FRACTIONS[1]))
    n_train = min(n_train, n_subjects - n_val - 1)
    wanted = set(series)
    entries: list[ManifestEntry] = []
    subject = f"{profile.name}-{s:03d}"
    split = "train" if s < n_train else "val" if s < n_train + n_val else "test"
    has_lesion = bool(rng.random() < profile.lesion_rate)
    severity = float(np.clip(rng.normal(profile.lesion_severity, 0.2), 0.05, 1.0)) if has_lesion else 0.0
    labels = phantom_labels(rng, size, n_slices, profile.body_scale, severity)
    texture = tissue_texture(rng, labels.shape)
    hu = tissue_hu(labels, texture)
    scanners = profile.scanners((1.0, LOW_DOSE_FRACTION))
    # every CT series is drawn, written or not, so a subset has the same images as the full study
    acquired = [ct_acquire_scanners(hu[k], scanners, pixel_mm, rng) for k in range(n_slices)]
    ct, ct_low, ct_b = (np.stack([a[i] for a in acquired]) for i in range(3))
    if wanted & {"mr", "mr-kspace"}:  # MR's noise from its own stream: the CT is the same without it
        mr = mr_acquire(labels, texture, profile, np.random.default_rng([seed, s, 7]), matrix=mr_size)
    label = "lesion" if has_lesion else "normal"
    # The arrays are (k, rows, cols) as displayed: columns run to the patient's left and rows
    # to posterior, so the NIfTI affine (RAS+) has negative x and y steps, like the DICOM series.
    # Placed as the DICOM series are (first pixel at half the field of view to the patient's right
    # and anterior), so every series of a subject shares one patient frame.
    affine = np.diag([-pixel_mm, -pixel_mm, slice_mm, 1.0])
    affine[:2, 3] = FIELD_OF_VIEW_MM / 2
    mr_affine = np.diag([-mr_pixel_mm, -mr_pixel_mm, slice_mm, 1.0])
    mr_affine[:2, 3] = FIELD_OF_VIEW_MM / 2 - (mr_pixel_mm - pixel_mm) / 2  # coarser voxels, same field

    def add(rel: Path, modality: str, domain: str) -> None:
        entries.append(ManifestEntry(str(rel), subject, modality, split, f"{profile.name}-{domain}", label, subject))

    def add_ct(series: np.ndarray, folder: str, offset: int, scale: int = 1) -> None:
        rel = Path(folder) / subject
        write_dicom_series(
            series, out_dir / rel, spacing=(pixel_mm * scale, pixel_mm * scale, slice_mm), patient_id=subject,
            manufacturer=f"{profile.name} CT", seed=seed + s + offset,
        )
        add(rel, "CT", folder)

    if "ct" in wanted:
        add_ct(ct, "ct", 0)
    if "ct-low-dose" in wanted:
        add_ct(ct_low, "ct" + LOW_DOSE, 500)
    if "ct-scanner-b" in wanted:
        add_ct(ct_b, "ct" + SCANNER_B, 900)
    if "ct-low-res" in wanted:
        for scale in LOW_RES_SCALES:
            add_ct(coarse_grid(ct, scale), f"ct-low-res-x{scale}", 700 + scale, scale)
    if "mr" in wanted:
        mr_rel = Path("mr") / f"{subject}.nii.gz"
        write_nifti(mr.transpose(2, 1, 0), mr_affine, out_dir / mr_rel)
        add(mr_rel, "MR", "mr")
    if "mr-kspace" in wanted:
        # the site's own sampling pattern per accelerated protocol (its scanner set-up): the same for all subjects
        masks = {r: sampling_mask(mr_size, r, np.random.default_rng(seed + 31 * r), profile.mr_center_fraction)
                 for r in ACCELERATIONS}
        for r, mask in masks.items():
            rel = Path(f"mr-kspace-r{r}") / f"{subject}.nii.gz"
            write_kspace(undersample(mr, mask), mr_affine, out_dir / rel)
            add(rel, "MR", f"mr-kspace-r{r}")
    if "seg" in wanted:
        seg_rel = Path("seg") / f"{subject}.nii.gz"
        write_nifti(labels.transpose(2, 1, 0), affine, out_dir / seg_rel, dtype=np.uint8)
        add(seg_rel, SEGMENTATION, "seg")
    return entries


def simulate_study(
    out_dir: str | Path,
    *,
    n_sites: int = 3,
    n_subjects: int = 10,
    n_slices: int = 16,
    size: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    workers: int | None = None,
    series: tuple[str, ...] = SERIES,
    mr_matrix: int = MR_MATRIX,
) -> list[Path]:
    """Write ``n_sites`` hospitals under ``out_dir``; returns their folders in order.

    Subjects are independent (each its own seeded stream), so every site's subjects are
    simulated in ``workers`` processes at once (default: one per CPU), keeping both cores
    busy however the subjects divide among sites; the files are the same as one after the
    other. With several workers ``progress`` hears of each finished site."""
    check_site_settings(n_subjects, n_slices, size, series)  # here, not in a worker process
    mr_size = mr_matrix_for(size, mr_matrix)
    out_dir = Path(out_dir)
    jobs = [(profile, out_dir / f"site-{index + 1:02d}-{profile.name}", seed * 1000 + index)
            for index, profile in enumerate(site_profiles(n_sites, seed))]
    workers = min(workers or os.cpu_count() or 1, len(jobs) * n_subjects)
    if workers <= 1:
        for profile, folder, site_seed in jobs:
            simulate_site(profile, folder, n_subjects=n_subjects, n_slices=n_slices, size=size, seed=site_seed,
                          progress=progress, series=series, mr_matrix=mr_matrix)
    else:
        entries: dict[Path, dict[int, list[ManifestEntry]]] = {folder: {} for _, folder, _ in jobs}
        context = multiprocessing.get_context("spawn")  # no forked torch or Ray state in the workers
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            running = {pool.submit(simulate_subject, profile, folder, s, n_subjects=n_subjects, n_slices=n_slices,
                                   size=size, seed=site_seed, series=series, mr_matrix=mr_matrix): (profile, folder, s)
                       for profile, folder, site_seed in jobs for s in range(n_subjects)}
            for done in concurrent.futures.as_completed(running):
                profile, folder, s = running[done]
                entries[folder][s] = done.result()  # a failed subject raises here, in the caller's process
                if len(entries[folder]) == n_subjects:
                    finish_site(profile, folder, [e for k in sorted(entries[folder]) for e in entries[folder][k]])
                    if progress is not None:
                        progress(f"{folder.name}: written")
    folders = []
    for _, folder, _ in jobs:
        (folder / SIMULATED_MARK).write_text("written by medgan sites simulate; --force may replace this folder\n")
        folders.append(folder)
    study = {"sites": [f.name for f in folders], "seed": seed, "subjects": n_subjects, "slices": n_slices, "size": size,
             "mr-matrix": mr_size, "series": list(series), "format": SIMULATOR_FORMAT}
    (out_dir / "study.json").write_text(json.dumps(study, indent=2))
    return folders


#: The simulator's output format; 2: NIfTI affines say what the arrays hold (format 1's
#: claimed RAS for arrays in display order, which the canonical orientation would flip).
SIMULATOR_FORMAT = 2


def study_mr_matrix(sites_dir: Path) -> int:
    """The MR matrix a simulated study in ``sites_dir`` was written at (its study.json; a study
    written before it recorded one had its CT matrix over the whole factor that brought it to
    at most 256 where it was larger)."""
    study = json.loads((sites_dir / "study.json").read_text())
    size = int(study.get("size", 512))
    return int(study.get("mr-matrix") or size // max(1, size // 256))


def stale_simulation(sites_dir: Path) -> str:
    """Why a simulated study in ``sites_dir`` cannot be used ('' when it can)."""
    study = sites_dir / "study.json"
    try:
        found = int(json.loads(study.read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return ""
    if found >= SIMULATOR_FORMAT:
        return ""
    return (f"{sites_dir} was simulated by an older version (format {found}; its NIfTI orientation is wrong for "
            f"this one); replace it with 'medgan sites simulate --force --out {sites_dir}'")


def missing_series(sites_dir: Path, needed: Sequence[str], task: str) -> str:
    """Why a simulated study in ``sites_dir`` lacks series a task reads ('' when it has them,
    or does not say what it holds): a study simulated for one task, run with another."""
    try:
        study = json.loads((sites_dir / "study.json").read_text())
        written = study["series"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not isinstance(written, list):
        return ""
    lacking = [name for name in needed if name not in written]
    if not lacking:
        return ""
    redo = (f"medgan sites simulate --force --out {shlex.quote(str(sites_dir))} --task {task} --sites {len(study.get('sites', []))} "
            f"--subjects {study.get('subjects')} --slices {study.get('slices')} --size {study.get('size')} "
            f"--seed {study.get('seed')}")
    return (f"{sites_dir} was simulated for another task (series {', '.join(map(str, written))}); task {task} "
            f"also reads {', '.join(lacking)}. Give another --sites-dir, or simulate them (only the folders the "
            f"simulator wrote are replaced): {redo}")


#: A file in every site folder the simulator wrote: only such folders are ever replaced.
SIMULATED_MARK = ".medgan-simulated"


def remove_simulated_study(out_dir: str | Path) -> list[Path]:
    """Remove what ``simulate_study`` wrote in ``out_dir`` and nothing else: the site folders
    study.json lists that carry the simulator's mark, then study.json. Anything else in
    ``out_dir`` (a site the user added, notes) stays. Returns the folders kept back."""
    import shutil

    out_dir = Path(out_dir)
    study = out_dir / "study.json"
    kept = []
    for folder in find_sites(out_dir) if study.is_file() else []:
        if (folder / SIMULATED_MARK).is_file() and folder.parent == out_dir:
            shutil.rmtree(folder)
        elif folder.exists():
            kept.append(folder)
    study.unlink(missing_ok=True)
    return kept


def find_sites(sites_dir: str | Path) -> list[Path]:
    """Site folders of a study, in order: those listed in study.json, else any with a manifest."""
    sites_dir = Path(sites_dir)
    study = sites_dir / "study.json"
    if study.is_file():
        return [sites_dir / name for name in json.loads(study.read_text())["sites"]]
    return sorted(p.parent for p in sites_dir.glob("*/manifest.csv"))


def phantom_ct_pairs(
    n: int, task: "TaskConfig", seed: int = 0, clinical: bool = False
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``n`` (low-dose, full-dose) CT slices of one phantom subject, prepared like a site's
    data: at clinical geometry (512×512 over 400 mm, resampled to ``task.spacing``, the
    whole CT range), or windowed and resized to ``image-size``. The coordinator uses these
    for preview grids: no patient data."""
    from medgan_core.data.preprocess import CT_FULL_RANGE, resample_slices, resize_slices, window_ct

    rng = np.random.default_rng(seed + 424242)
    profile = DEFAULT_SITES[0]
    size = 512 if clinical else 128
    labels = phantom_labels(rng, size, n, profile.body_scale, severity=0.6)
    hu = tissue_hu(labels, tissue_texture(rng, labels.shape))
    pixel_mm = FIELD_OF_VIEW_MM / size
    pairs = [ct_acquire_doses(hu[k], profile, pixel_mm, rng, (1.0, LOW_DOSE_FRACTION)) for k in range(n)]
    full, low = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    if clinical:
        return tuple(resample_slices(window_ct(x, *CT_FULL_RANGE), (pixel_mm, pixel_mm), task.spacing)
                     for x in (low, full))  # type: ignore[return-value]
    window = (task.window_low, task.window_high)
    return resize_slices(window_ct(low, *window), task.image_size), resize_slices(window_ct(full, *window), task.image_size)


def phantom_mr_kspace(
    n: int, task: "TaskConfig", acceleration: int, seed: int = 0
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``n`` (undersampled input, fully sampled target) MR slices of one phantom subject at
    ``acceleration``, acquired on the simulator's MR matrix (``MR_MATRIX`` over
    ``FIELD_OF_VIEW_MM``) and prepared like a site's data (at ``task.spacing``); for the
    coordinator's preview grids."""
    import torch

    from medgan_core.data.kspace import matrix_at, reconstruction_pair

    rng = np.random.default_rng(seed + 525252)
    profile, size = DEFAULT_SITES[0], MR_MATRIX
    labels = phantom_labels(rng, size, n, profile.body_scale, severity=0.6)
    mr = mr_acquire(labels, _texture(rng, labels.shape, sigma=1.5), profile, rng)
    mask = sampling_mask(size, acceleration, rng, profile.mr_center_fraction)
    pixel_mm = FIELD_OF_VIEW_MM / size
    inputs, targets = reconstruction_pair(undersample(mr, mask), mr, matrix_at((size, size), (pixel_mm, pixel_mm),
                                                                                 task.spacing),
                                          float(getattr(task.params, "tv_start", 0.0)))
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def phantom_mr_ct(
    n: int, task: "TaskConfig", seed: int = 0, clinical: bool = False
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``n`` aligned (MR, CT) slices of one phantom subject, prepared like a site's data (at
    clinical geometry: the CT at ``task.spacing`` over its whole range, the MR on its grid;
    else both resized to ``image-size``, the CT windowed); for the coordinator's previews."""
    from medgan_core.data.preprocess import (
        CT_FULL_RANGE,
        normalise_mr,
        resample_slices,
        resample_to,
        resize_slices,
        window_ct,
    )

    rng = np.random.default_rng(seed + 626262)
    profile = DEFAULT_SITES[0]
    size = 512 if clinical else 128
    labels = phantom_labels(rng, size, n, profile.body_scale, severity=0.6)
    texture = tissue_texture(rng, labels.shape)
    hu = tissue_hu(labels, texture)
    pixel_mm = FIELD_OF_VIEW_MM / size
    ct = np.stack([ct_acquire(hu[k], profile, pixel_mm, rng) for k in range(n)])
    mr = mr_acquire(labels, texture, profile, rng, matrix=mr_matrix_for(size) if clinical else None)
    if not clinical:
        return (resize_slices(normalise_mr(mr), task.image_size),
                resize_slices(window_ct(ct, task.window_low, task.window_high), task.image_size))
    ct_t = resample_slices(window_ct(ct, *CT_FULL_RANGE), (pixel_mm, pixel_mm), task.spacing)
    return resample_to(torch_from(normalise_mr(mr)), tuple(ct_t.shape[-2:])).clamp(-1, 1), ct_t


def torch_from(slices: np.ndarray) -> "torch.Tensor":
    """(n, rows, cols) -> an (n, 1, rows, cols) float tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]


def phantom_scanner_pair(
    n: int, task: "TaskConfig", seed: int = 0, clinical: bool = False
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``n`` slices of one phantom subject as (scanner B, main scanner) of the reference
    hospital, prepared like a site's data (``phantom_scanner_series``); for the
    coordinator's previews of scanner harmonisation."""
    profile = DEFAULT_SITES[0]
    main, second = phantom_scanner_series(n, task, profile, profile.scanners(), seed=seed + 727272, clinical=clinical)
    return second, main


def phantom_scanner_series(
    n: int, task: "TaskConfig", profile: SiteProfile, scanners: list[CTScanner], seed: int = 0,
    lesion_severity: float = 0.6, clinical: bool = False,
) -> list["torch.Tensor"]:
    """``n`` slices of one new phantom subject of ``profile``'s build, imaged by each of
    ``scanners`` from the same projections (each with its own quantum noise), prepared like
    a site's data: at clinical geometry (512×512 over 400 mm, resampled to ``task.spacing``,
    the whole CT range), or windowed and resized to ``image-size``. Naming a scanner twice
    gives a re-scan: what the same scanner shows of the same anatomy with other noise."""
    from medgan_core.data.preprocess import CT_FULL_RANGE, resample_slices, resize_slices, window_ct

    rng = np.random.default_rng(seed)
    size = 512 if clinical else 128
    pixel_mm = FIELD_OF_VIEW_MM / size
    labels = phantom_labels(rng, size, n, profile.body_scale, severity=lesion_severity)
    hu = tissue_hu(labels, tissue_texture(rng, labels.shape))
    acquired = [ct_acquire_scanners(hu[k], scanners, pixel_mm, rng) for k in range(n)]
    by_scanner = [np.stack([a[i] for a in acquired]) for i in range(len(scanners))]
    if clinical:
        return [resample_slices(window_ct(x, *CT_FULL_RANGE), (pixel_mm, pixel_mm), task.spacing) for x in by_scanner]
    window = (task.window_low, task.window_high)
    return [resize_slices(window_ct(x, *window), task.image_size) for x in by_scanner]


def site_profile(site_dir: str | Path) -> SiteProfile:
    """The profile a simulated site was written with (its ``site.json``)."""
    path = Path(site_dir) / "site.json"
    if not path.exists():
        raise ConfigError(f"{path} not found: {site_dir} is not a site simulated by medgan_core")
    return SiteProfile(**json.loads(path.read_text()))
