"""Secure aggregation (SecAgg+): the coordinator sees only the sum of the sites' updates.

In Flower 1.42 SecAgg+ exists only on the legacy stack: a ``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` with a ``LegacyContext`` on the server, ``secaggplus_mod`` around a
``NumPyClient`` on the sites. This module is that path. Each site masks ``[w, w * weights]``
(w = its sample count); the server unmasks only the sum and so obtains the same
sample-weighted mean as plain FedAvg, up to quantisation (clipping range ±8).

This module is the coordinator's half; the hospital's half is ``client.secagg``. The run
folder gets the same files as the plain path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from flwr.app import Context
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from medgan_core.arrays import check_arrays
from medgan_core.study_config import StudyConfig
from medgan_core.errors import ConfigError
from medgan_core.privacy.dp_sgd import validate_private_modules
from medgan_core.sharing import ordered_names
from medgan_core.site_label import LEGACY_SITE_NAME_KEY, is_site_name
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task
from server.warm_start import start_from_initial_model
from server.report import write_report
from server.run_folder import RunFolder
from server.study import RoundSummary, record_round, round_config_items
from server.tracking import NoTracking, Tracker, open_tracker
from strategies.grouped_fedavg import RoundLog, SiteReply, weighted_metrics

CLIPPING_RANGE = 8.0  # SecAgg+ quantises each weight within ±8: far beyond GAN weights here


def _site_reply(node_id: int, num_examples: int, metrics: dict) -> SiteReply:
    """A legacy reply as the plain path's: its scalars, and the name the site announced
    among them (``LEGACY_SITE_NAME_KEY``; kept only if it is a site label)."""
    name = metrics.get(LEGACY_SITE_NAME_KEY, "")
    scalars = {k: float(v) for k, v in metrics.items() if k != LEGACY_SITE_NAME_KEY}
    return SiteReply(node_id, float(num_examples), scalars, {}, site=name if is_site_name(name) else "")


class RecordingFedAvg(LegacyFedAvg):
    """Legacy FedAvg that writes the run folder: checkpoint, samples, metrics, per round."""

    def __init__(self, study: StudyConfig, folder: RunFolder, task: Task,
                 progress: Callable[[RoundSummary], None] | None, **kwargs: object) -> None:
        config = round_config_items(study, folder)
        super().__init__(
            on_fit_config_fn=lambda rnd: {**config, "server-round": rnd},
            on_evaluate_config_fn=lambda rnd: {**config, "server-round": rnd},
            initial_parameters=ndarrays_to_parameters([task.get_weights()[n] for n in ordered_names(task)]),
            **kwargs,  # type: ignore[arg-type]
        )
        self.study, self.folder, self.task, self.progress = study, folder, task, progress
        self.tracker: Tracker = NoTracking()
        self.names = ordered_names(task)
        self.current = task.get_weights()
        self.logs: dict[int, RoundLog] = {}
        self.started = time.monotonic()
        self._latest: Parameters = self.initial_parameters  # type: ignore[assignment]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        log = self.logs.setdefault(server_round, RoundLog())
        log.train = [_site_reply(proxy.node_id, res.num_examples, res.metrics) for proxy, res in results]
        log.excluded = [{"node": -1, "reason": f"site error: {f}"} for f in failures]
        parameters, _ = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            arrays = dict(zip(self.names, parameters_to_ndarrays(parameters)))
            check_arrays(arrays, self.task.weight_shapes(), f"secure aggregate of round {server_round}")
        return parameters, weighted_metrics(log.train)

    def evaluate(self, server_round: int, parameters: Parameters):  # type: ignore[override]
        if server_round == 0:  # the initial model; rounds >= 1 are recorded after client evaluation
            self._record(0, parameters)
        self._latest = parameters
        return None

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        log = self.logs.setdefault(server_round, RoundLog())
        log.evaluate = [_site_reply(proxy.node_id, res.num_examples, res.metrics) for proxy, res in results]
        self._record(server_round, self._latest)
        return None, weighted_metrics(log.evaluate)

    def _record(self, server_round: int, parameters: Parameters) -> None:
        arrays = dict(zip(self.names, parameters_to_ndarrays(parameters)))
        summary = record_round(self.study, self.folder, self.task, server_round, arrays, self.current,
                               self.logs.get(server_round), tracker=self.tracker)
        summary.seconds = time.monotonic() - self.started
        self.started = time.monotonic()
        self.current = arrays
        if self.progress is not None:
            self.progress(summary)


def build_secagg_server_app(
    study: StudyConfig, run_dir: str | Path, progress: Callable[[RoundSummary], None] | None = None
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if study.run.resume:
            raise ConfigError("run.resume is not supported with privacy.secagg yet; start a new run")
        task = build_task(study.task, "cpu")
        start_from_initial_model(task, study)  # before the folder starts: a bad starting model leaves nothing behind
        folder = RunFolder(Path(run_dir)).start(study)
        if study.privacy.enabled:
            validate_private_modules(task.private_modules)
        n = study.run.num_sites
        strategy = RecordingFedAvg(
            study, folder, task, progress,
            fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n, min_evaluate_clients=n, min_available_clients=n,
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=study.run.rounds), strategy=strategy)
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                # Share keys with every site; any two thirds (at least 2) can rebuild a dropped
                # site's mask, fewer learn nothing.
                num_shares=1.0, reconstruction_threshold=2 / 3,
                clipping_range=CLIPPING_RANGE, timeout=study.run.round_timeout,
            )
        )
        strategy.tracker = open_tracker(study.run.tracking, folder.root)
        try:
            workflow(grid, legacy)
        finally:
            strategy.tracker.close()
        write_report(folder, study)

    return app
