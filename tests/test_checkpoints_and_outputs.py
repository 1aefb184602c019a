from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgan_core.errors import MedGANError
from medgan_core.fileio import append_jsonl, read_jsonl
from medgan_core.checkpoints import load_checkpoint, save_checkpoint
from server.samples import save_grid


def test_checkpoint_round_trip_with_metadata(tmp_path: Path) -> None:
    arrays = {"generator.w": np.arange(6, dtype=np.float32).reshape(2, 3), "discriminator.b": np.ones(4, np.float32)}
    path = save_checkpoint(tmp_path / "ck" / "round-001.safetensors", arrays, {"round": 1, "study": {"a": [1, 2]}})
    loaded, meta = load_checkpoint(path)
    assert meta == {"round": 1, "study": {"a": [1, 2]}}
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert [p.name for p in path.parent.iterdir()] == ["round-001.safetensors"]  # no temp files left


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", {"g.w": np.zeros(3, np.float32)}, {})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MedGANError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(MedGANError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_sample_grid_png(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 5 * 8 * 8).reshape(5, 1, 8, 8)
    path = save_grid(images, tmp_path / "s.png", columns=3)
    with Image.open(path) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (2 * (2 * 10 + 2), 2 * (3 * 10 + 2))  # 2 rows x 3 cols of 8+2 px, upscaled x2
    assert pixels.min() == 0 and pixels.max() == 255


def test_jsonl_reader_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"round": 0})
    append_jsonl(path, {"round": 1})
    with path.open("a") as handle:
        handle.write('{"round": 2, "tra')
    assert [r["round"] for r in read_jsonl(path)] == [0, 1]


def test_a_new_run_archives_the_previous_one_instead_of_mixing(tmp_path: Path) -> None:
    from medgan_core.study_config import StudyConfig
    from server.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.start(StudyConfig())
    folder.append_metrics({"round": 0})
    folder.start(StudyConfig())
    assert folder.read_metrics() == []
    assert (tmp_path / "run.1" / "metrics.jsonl").is_file()
    folder.append_metrics({"round": 0})
    folder.start(StudyConfig())
    assert (tmp_path / "run.2" / "config.toml").is_file()
