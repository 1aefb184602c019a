"""What a study sends to every site (the Flower App Bundle) and the hash a site approves it by."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client.supernode_guard import app_hash
from medgan_core.runtime import APP_DIR

APP_CODE = ("medgan_core", "client", "server", "strategies")


def _flower_hash(project: Path) -> str:
    """What ``flwr run PROJECT`` sends, hashed: Flower's own builder over the whole folder."""
    return hashlib.sha256(build_fab_from_disk(project)).hexdigest()


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of this checkout's app: its code, pyproject.toml, and files a study must not send."""
    root = tmp_path / "project"
    for part in APP_CODE:
        shutil.copytree(Path(APP_DIR) / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(Path(APP_DIR) / name, root / name)
    return root


def test_the_site_hash_is_the_bundle_flower_sends() -> None:
    assert app_hash(APP_DIR) == _flower_hash(Path(APP_DIR))


@pytest.mark.security
def test_the_bundle_holds_the_app_code_and_nothing_else_of_the_checkout() -> None:
    """Not the README, tests, benchmark results or data manifests: a coordinator's checkout
    may hold files that are none of a hospital's business, and results change every week."""
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(Path(APP_DIR)))).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {*APP_CODE, "pyproject.toml", ".info"}, tops
    for needed in ("client/app.py", "server/app.py", "medgan_core/metrics/phantom_features.json"):
        assert needed in names


def test_files_outside_the_app_leave_its_hash_alone_and_code_changes_it(project: Path) -> None:
    before = app_hash(project)
    assert before == _flower_hash(project)
    (project / "benchmarks" / "results").mkdir(parents=True)
    (project / "benchmarks" / "results" / "results.json").write_text("{}\n")
    (project / "notes.md").write_text("a coordinator's notes\n")
    (project / "README.md").write_text("edited\n")
    assert app_hash(project) == before == _flower_hash(project)
    with (project / "client" / "app.py").open("a") as code:
        code.write("\n# changed\n")
    assert app_hash(project) != before
    assert app_hash(project) == _flower_hash(project)


def test_without_fab_include_the_hash_is_still_flowers(project: Path) -> None:
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    start = text.index("fab-include")
    pyproject.write_text(text[:start] + text[text.index("]", start) + 1:])
    (project / "notes.md").write_text("sent too, without fab-include\n")
    assert app_hash(project) == _flower_hash(project)
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project))).namelist()
    assert "notes.md" in names
