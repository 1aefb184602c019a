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

    from medgan_core.study_config import StudyConfig
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


def _module_graph() -> dict[str, set[str]]:
    """Our modules and what each imports, function-level imports included. Importing a
    submodule runs its packages' ``__init__`` first, so that counts as an edge too, except
    for a package the importer is itself in (already being imported)."""
    files = {}
    for package in ("medgan_core", "client", "server", "strategies", "medgan"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
            for target in targets:
                parts = target.split(".")
                graph[name] |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys() - own - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles() -> None:
    assert _circles(_module_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_readers_do_not_import_the_simulator() -> None:
    graph = _module_graph()
    readers = [m for m in graph if m.startswith("medgan_core.data.") and m != "medgan_core.data.simulate"]
    assert len(readers) >= 5
    assert all("medgan_core.data.simulate" not in graph[m] for m in readers), readers


def test_a_task_module_is_the_tasks_whole_spec() -> None:
    """Config knows no task; the registry is the only place that lists the built-in tasks."""
    from medgan_core.tasks.registry import BUILT_IN

    config = (ROOT / "medgan_core" / "config.py").read_text()
    assert not [name for name in BUILT_IN if f'"{name}"' in config and name != "synthesis"]
    graph = _module_graph()
    assert not {m for m in graph["medgan_core.config"] if m.startswith("medgan_core.tasks")}
