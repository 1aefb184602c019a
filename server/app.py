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

from medgan_core.study_config import StudyConfig
from server.run_folder import RunFolder
from server.study import RoundSummary, SiteWatcher, run_study


def build_server_app(
    study: StudyConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    progress: Callable[[RoundSummary], None] | None = None,
    on_train_replies: Callable[[int, list[Message]], None] | None = None,
    failures: list[BaseException] | None = None,
    watch: SiteWatcher | None = None,
) -> ServerApp:
    """A ServerApp for ``study`` (or, when None, for the run config Flower passes in).

    With ``failures`` given, an error that ends the study is appended there instead of
    raised into Flower (which would print its traceback and carry on): the caller raises
    it after the simulation, and the CLI reports it in one line."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            config = study if study is not None else StudyConfig.from_flat(context.run_config)
            folder = RunFolder(Path(run_dir) if run_dir is not None else Path(config.run.out_dir))
            run_study(grid, config, folder, progress=progress, on_train_replies=on_train_replies, watch=watch)
        except BaseException as exc:
            if failures is None:
                raise
            failures.append(exc)

    return app


app = build_server_app()
