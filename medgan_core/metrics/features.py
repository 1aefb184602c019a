"""FID and KID on a feature network this project trains on its own phantoms.

Hospitals are offline and Inception weights are not ours to download, so the features
come from ``PhantomFeatureNet``: a small CNN trained (``python -m
medgan_core.metrics.train_features``) to read anatomy from CT and MR slices of the
simulator — the area fraction of every tissue — across all simulated scanners, doses,
kernels and both modalities. A small lesion segmenter beside it (other / liver / lesion
per pixel) reads a slice's lesion burden, which checks conditional synthesis. Its 96-dimensional pooled activations are
therefore sensitive to what matters in a medical image (organ layout, tissue contrast,
lesions) and, because it saw many scanners, less to one scanner's noise texture.

The trained weights ship inside the package as ``phantom_features.json`` (safetensors
bytes, base64-encoded, with their SHA-256): Flower app bundles carry only text files, and
every site must compute exactly the same features. Inputs of any size are resized to
64×64 (bilinear) first.

* FID: Fréchet distance between Gaussians fitted to the two feature sets,
  ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)``. Biased upwards for small sets
  (it needs many more samples than 96 to be stable), so compare FIDs only at equal n.
* KID: unbiased estimate of the squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)^3``, averaged over random subsets; unbiased at any n, so it
  is the one to read for the small sets a site holds. About 0 for the same distribution.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from medgan_core.errors import WeightsError
from medgan_core.models.unet import ResidualUNet

FEATURE_SIZE = 64  # input grid of the feature network
FEATURE_DIM = 96
N_TISSUES = 11  # the labels of medgan_core.data.simulate.TISSUES
N_GRADES = 4  # lesion-burden grades
LESION_CLASSES = ("other", "liver", "lesion")  # what the lesion segmenter labels per pixel
GRADE_EDGES = (0.0, 0.05, 0.15)  # burden upper bounds of grades 0, 1, 2 (above: 3)


def burden_grade(burden: torch.Tensor) -> torch.Tensor:
    """Lesion burden (fraction of the liver that is lesion) -> grade 0..3 (0: none)."""
    return torch.bucketize(burden, torch.tensor(GRADE_EDGES, dtype=burden.dtype))
WEIGHTS_FILE = Path(__file__).with_name("phantom_features.json")


class PhantomFeatureNet(nn.Module):
    """(n, 1, H, W) in [-1, 1] -> 96 features (with a tissue-fraction head that trains
    them), and a small lesion segmenter that reads a slice's lesion burden."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64), (64, FEATURE_DIM)):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GroupNorm(min(8, c_out), c_out), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.tissue = nn.Linear(FEATURE_DIM, N_TISSUES)
        # Lesions are a few pixels: a dense read (other / liver / lesion per pixel) learns
        # them far better than a global regression, and its burden is interpretable.
        self.lesions = ResidualUNet(8, channels=len(LESION_CLASSES), in_channels=1)

    @staticmethod
    def _resized(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (FEATURE_SIZE, FEATURE_SIZE):
            images = F.interpolate(images, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 96 FID/KID features: spatially averaged activations of the last layer."""
        return self.body(self._resized(images)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tissue-fraction logits (n, 11), per-pixel other/liver/lesion logits (n, 3, 64, 64))."""
        images = self._resized(images)
        return self.tissue(self.body(images).mean(dim=(2, 3))), self.lesions(images)

    @torch.no_grad()
    def read_burden(self, images: torch.Tensor) -> torch.Tensor:
        """Each slice's lesion burden as the segmenter sees it: lesion / (liver + lesion) pixels."""
        classes = self(images)[1].argmax(1)
        lesion = (classes == 2).sum(dim=(1, 2)).float()
        liver = (classes == 1).sum(dim=(1, 2)).float()
        return torch.where(lesion > 0, lesion / (lesion + liver).clamp(min=1), torch.zeros_like(lesion))


def save_feature_net(net: PhantomFeatureNet, path: str | Path, about: dict[str, object]) -> Path:
    """Write the weights as base64 safetensors in JSON, atomically, with a checksum."""
    payload = save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    record = {"format": "safetensors-base64", "sha256": hashlib.sha256(payload).hexdigest(), "about": about,
              "weights": base64.b64encode(payload).decode("ascii")}
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def load_feature_net(path: str | Path = WEIGHTS_FILE, device: torch.device | str = "cpu") -> PhantomFeatureNet:
    """The shipped (or a given) feature network, in eval mode; a damaged file is an error."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        payload = base64.b64decode(record["weights"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"feature network {path} cannot be read ({exc}); reinstall medgan-fl or retrain it with "
                           "'python -m medgan_core.metrics.train_features'") from exc
    if hashlib.sha256(payload).hexdigest() != record.get("sha256"):
        raise WeightsError(f"feature network {path}: checksum mismatch, the file is damaged")
    net = PhantomFeatureNet()
    try:
        net.load_state_dict(load_safetensors(payload))
    except RuntimeError as exc:
        raise WeightsError(f"feature network {path} does not fit this version's network (retrain it with "
                           f"'python -m medgan_core.metrics.train_features'): {str(exc).splitlines()[0]}") from exc
    return net.to(device).eval()


@torch.no_grad()
def extract_features(net: PhantomFeatureNet, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    device = next(net.parameters()).device
    out = [net.features(images[i : i + batch].float().to(device)).cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two (n, d) feature sets (each needs n >= 2)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(a.shape[1]) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root))
    return float(np.sum((mu_a - mu_b) ** 2) + max(trace, 0.0))


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> float:
    """KID: unbiased MMD² with the cubic polynomial kernel, mean over random subsets."""
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((p @ q.T / d + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        values.append((k_xx.sum() - np.trace(k_xx)) / off + (k_yy.sum() - np.trace(k_yy)) / off - 2.0 * k_xy.mean())
    return float(np.mean(values))


def fid_kid(net: PhantomFeatureNet, fake: torch.Tensor, real: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """``{"fid": …, "kid": …}`` of generated against real images."""
    f_fake, f_real = extract_features(net, fake), extract_features(net, real)
    return {"fid": frechet_distance(f_fake, f_real), "kid": kernel_distance(f_fake, f_real, seed=seed)}


#: At most this many images of each side enter the pairwise scores (memory grows with its square).
PAIRWISE_LIMIT = 1000


def feature_scores(net: PhantomFeatureNet, fake: torch.Tensor, real: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FID and KID, and the scores that see mode collapse: diversity, precision and recall."""
    f_fake, f_real = extract_features(net, fake), extract_features(net, real)
    rng = np.random.default_rng(seed)
    few_fake, few_real = (f[rng.permutation(len(f))[:PAIRWISE_LIMIT]] for f in (f_fake, f_real))
    return {"fid": frechet_distance(f_fake, f_real), "kid": kernel_distance(f_fake, f_real, seed=seed),
            "diversity": diversity(few_fake, few_real), **precision_recall(few_fake, few_real)}


def diversity(fake: np.ndarray, real: np.ndarray) -> float:
    """Mean pairwise feature distance of generated images as a share of the real images':
    about 1 when they vary as much as real anatomy, towards 0 as a generator collapses onto
    a few images (which FID can miss when those few are realistic)."""
    def spread(features: np.ndarray) -> float:
        distances = np.sqrt(((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))
        n = len(features)
        return float(distances.sum() / max(n * (n - 1), 1))

    return spread(fake) / max(spread(real), 1e-12)


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) in feature space: the share of
    generated images inside the real images' manifold (each real image's ball out to its k-th
    nearest real neighbour), and the share of real images inside the generated manifold.
    Precision is realism; recall is coverage, which a collapsed generator loses."""
    def radii(features: np.ndarray) -> np.ndarray:
        distances = np.sqrt(((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))
        return np.sort(distances, axis=1)[:, min(k, len(features) - 1)]

    def inside(points: np.ndarray, support: np.ndarray, support_radii: np.ndarray) -> float:
        distances = np.sqrt(((points[:, None, :] - support[None, :, :]) ** 2).sum(-1))
        return float((distances <= support_radii[None, :]).any(axis=1).mean())

    return {"precision": inside(fake, real, radii(real)), "recall": inside(real, fake, radii(fake))}
