"""Train the feature network behind FID/KID on simulator phantoms (no downloaded weights).

    python -m medgan_core.metrics.train_features [--subjects 240] [--steps 3000] [--out PATH]

Each subject is drawn from a random hospital profile with a random lesion severity and
imaged as CT (main scanner at full or quarter dose, or scanner B; the default CT window)
and as MR (percentile-normalised), so the features see every scanner the simulator
makes. Targets: per slice the area fraction of each tissue label (trains the FID/KID features),
per pixel other / liver / lesion (trains the lesion segmenter; lesion pixels weigh 5×).
Subjects with lesions are oversampled so every grade is well seen.
Seeded end to end; the default output is the file the package ships.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgan_core.data.preprocess import normalise_mr, window_ct
from medgan_core.data.labels import LESION, LIVER, lesion_burden
from medgan_core.data.simulate import (
    LOW_DOSE_FRACTION,
    _texture,
    ct_acquire_scanners,
    mr_acquire,
    phantom_labels,
    site_profiles,
    tissue_hu,
)
from medgan_core.metrics.features import (
    FEATURE_SIZE,
    N_TISSUES,
    WEIGHTS_FILE,
    PhantomFeatureNet,
    burden_grade,
    save_feature_net,
)

CT_WINDOW = (-160.0, 240.0)  # TaskConfig's default window


def training_slices(subjects: int, slices: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n, 1, 64, 64), tissue fractions (n, 11), tissue labels (n, 64, 64)) of phantoms."""
    rng = np.random.default_rng(seed)
    profiles = site_profiles(12, seed)
    size, pixel_mm = FEATURE_SIZE, 400.0 / FEATURE_SIZE
    images, fractions, label_maps = [], [], []
    for _ in range(subjects):
        profile = profiles[int(rng.integers(len(profiles)))]
        severity = float(rng.uniform(0.05, 1.0)) if rng.random() < 0.75 else 0.0
        labels = phantom_labels(rng, size, slices, profile.body_scale, severity)
        texture = _texture(rng, labels.shape, sigma=1.0)
        if rng.random() < 0.6:
            scanners = profile.scanners((1.0, LOW_DOSE_FRACTION))
            ct = np.stack([ct_acquire_scanners(tissue_hu(labels[k:k + 1], texture[k:k + 1])[0],
                                               [scanners[int(rng.integers(len(scanners)))]], pixel_mm, rng)[0]
                           for k in range(slices)])
            images.append(window_ct(ct, *CT_WINDOW))
        else:
            images.append(normalise_mr(mr_acquire(labels, texture, profile, rng)))
        counts = np.stack([np.bincount(labels[k].ravel(), minlength=N_TISSUES) for k in range(slices)])
        fractions.append(counts / counts.sum(axis=1, keepdims=True))
        label_maps.append(labels)
    return (torch.from_numpy(np.concatenate(images)).float()[:, None],
            torch.from_numpy(np.concatenate(fractions)).float(),
            torch.from_numpy(np.concatenate(label_maps)).long())


def lesion_targets(labels: torch.Tensor) -> torch.Tensor:
    """Tissue labels -> 0 other, 1 liver, 2 lesion."""
    return (labels == LIVER).long() + 2 * (labels == LESION).long()


def train_feature_net(subjects: int = 240, steps: int = 3000, seed: int = 0, log_every: int = 250) -> tuple[PhantomFeatureNet, dict[str, float]]:
    """Fit the network; returns it and its held-out errors (last 20 % of the subjects)."""
    torch.manual_seed(seed)
    images, fractions, labels = training_slices(subjects, seed=seed)
    targets = lesion_targets(labels)
    n_train = int(len(images) * 0.8)
    class_weights = torch.tensor([1.0, 1.0, 5.0])
    net = PhantomFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (64,), generator=generator)
        tissue, lesions = net(images[idx])
        loss = (-(fractions[idx] * F.log_softmax(tissue, dim=1)).sum(1).mean()
                + F.cross_entropy(lesions, targets[idx], weight=class_weights))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps}: loss {loss.item():.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        tissue, _ = net(images[n_train:])
        burden = net.read_burden(images[n_train:])
    truth = torch.from_numpy(lesion_burden(labels[n_train:].numpy().astype(np.uint8)))
    grade, true_grade = burden_grade(burden), burden_grade(truth)
    held_out = {
        "tissue-fraction-mae": float((tissue.softmax(1) - fractions[n_train:]).abs().mean()),
        "grade-accuracy": float((grade == true_grade).float().mean()),
        "grade-balanced-accuracy": float(np.mean([float((grade[true_grade == g] == g).float().mean())
                                                  for g in true_grade.unique()])),
        "burden-mae": float((burden - truth).abs().mean()),
        "burden-correlation": float(np.corrcoef(burden.numpy(), truth.numpy())[0, 1]),
        "held-out-slices": float(len(images) - n_train),
    }
    return net, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=240)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    args = parser.parse_args()
    start = time.time()
    net, held_out = train_feature_net(args.subjects, args.steps, args.seed)
    about = {"subjects": args.subjects, "steps": args.steps, "seed": args.seed, **held_out}
    save_feature_net(net, args.out, about)
    print(f"wrote {args.out} in {time.time() - start:.0f} s; held out: {held_out}")


if __name__ == "__main__":
    main()
