"""``medgan synth``: images from a synthesis model, marked synthetic wherever they go.

Each image carries no real patient's identity (new identifiers; in DICOM, Patient's Name
and Series Description say synthetic), and the folder's manifest and provenance.json say
which model, round and ε they came from, so they cannot pass for acquired scans.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import torch

from medgan_core.data.dicom_io import write_dicom_series
from medgan_core.data.manifest import ManifestEntry, write_manifest
from medgan_core.data.nifti_io import write_nifti
from medgan_core.data.png_io import write_png
from medgan_core.data.preprocess import to_hu
from medgan_core.errors import MedGANError
from medgan_core.fileio import atomic_write_text
from medgan_core.model_file import ModelFile
from medgan_core.tasks.conditional import GRADES, PREVIEW_BURDENS, SEVERITY_SCALE, ConditionalSynthesisTask
from medgan_core.tasks.synthesis import SynthesisTask

FORMATS = ("png", "nifti", "dicom")
BATCH = 64


def synthesise(model: ModelFile, n: int, out: Path, *, fmt: str = "png", label: int | None = None,
               severity: float | None = None, seed: int = 0, device: torch.device | str = "cpu") -> list[ManifestEntry]:
    if fmt not in FORMATS:
        raise MedGANError(f"--format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if n < 1:
        raise MedGANError(f"--n {n}; ask for at least one image")
    task = model.build(device)
    if not isinstance(task, SynthesisTask):
        raise MedGANError(f"medgan synth draws from synthesis and conditional models; this one is {model.task.name!r} "
                          "(use 'medgan infer')")
    conditions, tag = _conditions(task, n, label, severity)
    if out.exists() and any(out.iterdir()):
        raise MedGANError(f"{out} is not empty; name a new folder (synthetic images are never mixed into another)")
    out.mkdir(parents=True, exist_ok=True)
    images = torch.cat([task.sample(min(BATCH, n - i), seed=seed + i,
                                    conditions=None if conditions is None else conditions[i:i + BATCH])
                        for i in range(0, n, BATCH)])[:, 0].numpy()
    values = _values(images, model)
    provenance = model.provenance
    domain = f"synthetic-{str(provenance.get('study-id', 'unknown'))[:8]}-round-{provenance.get('round', '?')}"
    run_id = secrets.token_hex(4)  # no identifier derived from any training subject
    entries = []
    for index, image in enumerate(values):
        subject = f"synthetic-{run_id}-{index:05d}"
        if fmt == "png":
            rel = f"{subject}.png"
            write_png(np.rint((images[index] + 1) / 2 * 255).clip(0, 255).astype(np.uint8), out / rel)
        elif fmt == "nifti":
            rel = f"{subject}.nii.gz"
            write_nifti(image.T[:, :, None], np.diag([-1.0, -1.0, 1.0, 1.0]), out / rel)
        else:
            rel = subject
            write_dicom_series(image[None], out / rel, spacing=(1.0, 1.0, 1.0), patient_id=subject,
                               modality=model.task.modality, manufacturer="MedGAN-FL synthetic",
                               description=f"SYNTHETIC {model.task.name} {domain}", derived=True,
                               rescale_intercept=float(np.floor(min(image.min(), 0.0))), seed=index)
        entries.append(ManifestEntry(rel, subject, model.task.modality, "train", domain, tag))
    write_manifest(entries, out / "manifest.csv")
    atomic_write_text(out / "provenance.json", json.dumps(
        {"synthetic": True, "images": n, "format": fmt, "condition": tag, "seed": seed, "model": provenance,
         "pixel-spacing": "nominal 1 mm: the model knows no physical grid"}, indent=2) + "\n")
    return entries


def _conditions(task: SynthesisTask, n: int, label: int | None, severity: float | None) -> tuple[torch.Tensor | None, str]:
    if not isinstance(task, ConditionalSynthesisTask):
        if label is not None or severity is not None:
            raise MedGANError("this model is unconditional: --label and --severity do not apply")
        return None, ""
    if task.params.condition == "grade":
        if severity is not None or label is None or not 0 <= label < GRADES:
            raise MedGANError(f"this model is conditioned on the lesion-burden grade: pass --label 0 to {GRADES - 1}")
        return task.encode(torch.full((n,), PREVIEW_BURDENS[label])), f"grade-{label}"
    if label is not None or severity is None or not 0 <= severity <= 1:
        raise MedGANError("this model is conditioned on severity: pass --severity between 0 and 1")
    return task.encode(torch.full((n,), severity * SEVERITY_SCALE)), f"severity-{severity:g}"


def _values(images: np.ndarray, model: ModelFile) -> np.ndarray:
    """[-1, 1] -> HU within the training window (CT), or relative intensity 0-1000 (MR)."""
    config = model.task
    if config.modality == "CT":
        return to_hu(images, config.window_low, config.window_high).astype(np.float32)
    return ((images + 1) / 2 * 1000).astype(np.float32)
