"""The README's configuration tables document every study key a user can set."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from medgan_core.config import config_key
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import default_params, task_names

README = Path(__file__).resolve().parents[1] / "README.md"
# Keys documented inside the row of the key they belong to (server-optimizer's hyper-parameters).
IN_ANOTHER_ROW = {"server-lr", "server-beta1", "server-beta2", "server-tau"}


def _row_keys(readme: str) -> tuple[set[str], set[str]]:
    """Backticked keys naming a table row (its first cell), and those anywhere in a table row."""
    rows = [line.split("|") for line in readme.splitlines() if line.startswith("|")]
    named = {key for row in rows if len(row) > 2 for key in re.findall(r"`([a-z0-9-]+)`", row[1])}
    anywhere = {key for row in rows for key in re.findall(r"`([a-z0-9-]+)`", "|".join(row))}
    return named, anywhere


def test_every_study_key_has_a_row_in_the_readme() -> None:
    named, anywhere = _row_keys(README.read_text())
    shared = {flat.split(".", 1)[1] for flat in StudyConfig().to_flat()}
    own = {config_key(f.name) for name in task_names() for f in fields(default_params(name))}
    missing = sorted(k for k in shared | own if k not in named and not (k in IN_ANOTHER_ROW and k in anywhere))
    assert not missing, f"README has no table row for {missing}"
    assert IN_ANOTHER_ROW <= anywhere
