"""The coordinator side: a Flower ServerApp over ``server.study``.

``flwr run .`` uses ``app`` with the run config of pyproject.toml's
``[tool.flwr.app.config]`` (tables ``run`` and ``task``); ``medgan demo`` builds its own
ServerApp with ``build_server_app`` to add progress display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch  # noqa: F401  (import before Flower unpickles torch-backed arrays)
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from medgan_core.config import StudyConfig
from server.run_folder import RunFolder
from server.study import RoundSummary, run_study


def build_server_app(
    study: StudyConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    progress: Callable[[RoundSummary], None] | None = None,
    on_train_replies: Callable[[int, list[Message]], None] | None = None,
) -> ServerApp:
    """A ServerApp for ``study`` (or, when None, for the run config Flower passes in)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = study if study is not None else StudyConfig.from_flat(context.run_config)
        folder = RunFolder(Path(run_dir) if run_dir is not None else Path(config.run.out_dir))
        run_study(grid, config, folder, progress=progress, on_train_replies=on_train_replies)

    return app


app = build_server_app()
