"""DP with the patient as the record (``privacy.unit = "patient"``): a batch samples patients
and takes one slice of each, so a patient with many slices adds one clipped gradient to a
step, and ε is a patient's. Each test tries to break that."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medgan_core.config import PrivacyConfig, SiteConfig, privacy_config_from_flat
from medgan_core.data.dataset import SiteData
from medgan_core.data.manifest import read_manifest
from medgan_core.errors import ConfigError, PrivacyError
from medgan_core.privacy import DPSettings, SiteAccountant
from medgan_core.privacy.dp_sgd import PatientRows
from medgan_core.site_round import train_site_round
from medgan_core.tasks.registry import build_task, load_task_data, task_config

pytestmark = pytest.mark.security


def test_a_batch_takes_each_sampled_patient_once_and_any_of_their_slices() -> None:
    # five patients with 1, 2, 3, 10 and 4 slices, their rows interleaved as a site may stack them
    subjects = torch.tensor([3, 0, 1, 3, 2, 3, 1, 2, 2, 4, 4, 4, 4] + [3] * 7)
    rows = PatientRows.of(subjects)
    assert rows.patients == 5 and rows.counts.tolist() == [1, 2, 3, 10, 4]
    generator = torch.Generator().manual_seed(0)
    drawn, sizes = torch.zeros(len(subjects)), []
    for _ in range(4000):
        batch = rows.draw(0.4, generator)
        patients = subjects[batch]
        assert len(set(patients.tolist())) == len(patients)  # never two slices of one patient
        sizes.append(len(batch))
        drawn[batch] += 1
    assert sum(sizes) / len(sizes) == pytest.approx(0.4 * 5, rel=0.05)  # patients at rate q
    for patient, count in enumerate(rows.counts.tolist()):  # each of a patient's slices alike
        per_slice = drawn[subjects == patient] / 4000
        assert per_slice.sum().item() == pytest.approx(0.4, abs=0.03)
        assert per_slice.min().item() == pytest.approx(0.4 / count, abs=0.03)


def test_every_task_kind_reads_each_training_slices_patient(tiny_sites: list[Path]) -> None:
    manifest = read_manifest(tiny_sites[1])
    train_subjects = {e.subject for e in manifest.select(modality="CT", split="train")}
    for name in ("synthesis", "denoise", "cycle", "conditional"):
        data = load_task_data(tiny_sites[1], task_config(name=name, image_size=16, width=8, batch_size=4))
        assert data.train_subjects is not None and len(data.train_subjects) == data.num_train, name
        seen = set(data.train_subjects.tolist())
        if name == "cycle":  # the two scanners' training patients are distinct and together all of them
            assert data.train_input_subjects is not None and len(data.train_input_subjects) == len(data.train_input)
            assert len(seen) + len(set(data.train_input_subjects.tolist())) == len(train_subjects)
        else:
            assert len(seen) == len(train_subjects), name
            assert torch.bincount(data.train_subjects).tolist() == [4] * len(train_subjects)  # 4 slices each


def test_a_patient_level_round_samples_patients_and_plans_for_them(tiny_sites: list[Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = task_config(name="denoise", image_size=16, width=8, batch_size=3, local_steps=4, seed=0)
    task = build_task(config)
    data = load_task_data(tiny_sites[1], config)
    batches: list[torch.Tensor] = []
    original = type(task).draw_batches

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn = original(self, *args, **kwargs)
        batches.extend(drawn.values())
        return drawn

    monkeypatch.setattr(type(task), "draw_batches", spy)
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0, secure_rng=False, unit="patient")
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path))
    metrics = train_site_round(task, data, site, privacy, planned_rounds=1, study_id="p", seed=0)
    patients = len(set(data.train_subjects.tolist()))
    assert metrics["sample-rate"] == pytest.approx(3 / patients)  # the batch over patients, not slices
    assert len(batches) == 4 and any(len(b) for b in batches)
    for batch in batches:
        assert len(set(data.train_subjects[batch].tolist())) == len(batch)


def test_patient_level_dp_on_data_without_patients_is_refused_in_one_line() -> None:
    task = build_task(task_config(name="synthesis", image_size=16, width=8, batch_size=4, z_dim=8))
    images = torch.zeros(8, 1, 16, 16)
    dp = DPSettings(1.0, 1.0, 0.5, 4, secure_rng=False, unit="patient")
    with pytest.raises(PrivacyError, match="privacy.unit = 'patient' needs each training slice's patient"):
        task.train(SiteData("s", images, images), 1, seed=0, dp=dp, accountant=SiteAccountant())


def test_an_unknown_unit_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="privacy.unit = 'voxel'"):
        privacy_config_from_flat({"privacy.unit": "voxel"})


def test_a_hospital_refuses_a_study_whose_epsilon_protects_a_slice(tiny_sites: list[Path]) -> None:
    """A hospital's policy (default: on) requires ε per patient; a simulated site lets the study decide."""
    from client.site import site_from_context

    hospital = site_from_context({"data-path": str(tiny_sites[0]), "site-name": "st-mary"}, {})
    assert hospital.require_patient_level
    assert hospital.refusal(PrivacyConfig(unit="patient")) == ""
    assert hospital.refusal(PrivacyConfig(unit="slice")) == (
        "site st-mary requires ε per patient ([privacy] unit = \"patient\"), the study asks for unit = 'slice' (a "
        "patient with k slices would be covered only as a group of k); refused by the site's policy")
    relaxed = site_from_context({"data-path": str(tiny_sites[0]), "require-patient-level": "false"}, {})
    assert relaxed.refusal(PrivacyConfig(unit="slice")) == ""
    assert SiteConfig(str(tiny_sites[0])).refusal(PrivacyConfig(unit="slice")) == ""


def test_the_unit_travels_to_the_sites_with_the_round() -> None:
    """What a site trains with is rebuilt from the round's flat config: the unit must survive it."""
    from medgan_core.study_config import StudyConfig

    flat = StudyConfig().replace(privacy={"unit": "patient"}).to_flat()
    assert flat["privacy.unit"] == "patient"
    assert privacy_config_from_flat(flat).unit == "patient"
    assert privacy_config_from_flat(StudyConfig().to_flat()).unit == "slice"
