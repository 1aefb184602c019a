"""The runtime helpers: device choice and the CPU recorded beside measured results."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from medgan_core.errors import ConfigError
from medgan_core.runtime import cpu_model, resolve_device


def test_cpu_model_is_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                       "flags\t\t: fpu avx512f\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n")
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Platinum 8481C"


def test_cpu_model_falls_back_without_a_model_name(tmp_path: Path) -> None:
    fallback = platform.processor() or platform.machine()
    assert cpu_model(tmp_path / "absent") == fallback
    blank = tmp_path / "cpuinfo"
    blank.write_text("processor\t: 0\nmodel name\t:   \n")
    assert cpu_model(blank) == fallback


def test_resolve_device_refuses_what_is_not_there() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_comparison_records_the_cpu_model_with_its_seconds() -> None:
    from medgan.compare import machine

    assert f"({cpu_model()}, {platform.machine()})" in machine()
