"""The dependency rule of DESIGN.md, checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_core_imports_no_flower_and_no_adapters() -> None:
    assert not _imports("medgan_core") & {"flwr", "client", "server", "strategies", "medgan"}


def test_strategies_work_on_arrays_not_torch_models() -> None:
    code = "import strategies, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_flower_app_components_exist() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from client.app import app as client_app
    from server.app import app as server_app

    assert isinstance(client_app, ClientApp) and isinstance(server_app, ServerApp)


def test_rooms_by_who_runs_them() -> None:
    """Hospital code (client/) and coordinator code (server/) never import each other; only the
    command layer (medgan/) assembles both, and nothing below it imports it."""
    assert not _imports("server") & {"client", "medgan"}
    assert not _imports("client") & {"server", "medgan"}
    assert not _imports("strategies") & {"client", "server", "medgan"}


def test_round_instructions_cross_once_typed_and_without_defaults() -> None:
    import pytest

    from medgan_core.config import StudyConfig
    from medgan_core.errors import ConfigError
    from medgan_core.round_instructions import RoundInstructions

    study = StudyConfig().replace(run={"rounds": 7}, task={"name": "denoise"})
    flat = {**RoundInstructions.for_study(study, "abc123"), "server-round": 3}
    parsed = RoundInstructions.from_flat(flat)
    assert (parsed.task, parsed.privacy, parsed.aggregation) == (study.task, study.privacy, study.aggregation)
    assert (parsed.planned_rounds, parsed.study_id, parsed.server_round) == (7, "abc123", 3)
    for key in ("study-id", "planned-rounds", "server-round", "device"):
        with pytest.raises(ConfigError, match=key):
            RoundInstructions.from_flat({k: v for k, v in flat.items() if k != key})
    with pytest.raises(ConfigError, match="cannot name a file"):
        RoundInstructions.from_flat({**flat, "study-id": "../other"})
