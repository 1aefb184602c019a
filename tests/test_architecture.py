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
    assert not _imports("medgan_core") & {"flwr", "client", "server", "strategies"}


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
