"""Secure aggregation (SecAgg+), the hospital's half: a legacy NumPyClient under ``secaggplus_mod``.

In Flower 1.42 SecAgg+ exists only on the legacy stack (``server.secagg`` is the
coordinator's half). The site masks its update so the coordinator sees only the sum.
Site training, DP-SGD, the accountant and the rule of what may leave are the same code
as the plain path (``medgan_core.site_round``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Scalar
from flwr.compat.client.numpy_client import NumPyClient

from client.audit import audit_legacy_mod
from client.site import cached_site_data, site_from_context, site_seed, site_task
from medgan_core.arrays import check_arrays
from medgan_core.config import SiteConfig
from client.ray_guard import ray_exposure
from medgan_core.errors import PrivacyError
from medgan_core.round_instructions import RoundInstructions
from medgan_core.runtime import resolve_device
from medgan_core.sharing import ordered_names
from medgan_core.site_label import LEGACY_SITE_NAME_KEY
from medgan_core.site_round import outgoing_eval_metrics, outgoing_train_metrics, train_site_round
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task


class SiteNumPyClient(NumPyClient):
    def __init__(self, site: SiteConfig) -> None:
        self.site = site

    def _task(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[Task, RoundInstructions]:
        if refusal := ray_exposure():  # before any image is read
            raise PrivacyError(refusal)
        round_ = RoundInstructions.from_flat(config)  # parsed once, typed, no defaults
        device = resolve_device(self.site.device if self.site.device != "auto" else round_.device)
        task = build_task(site_task(round_.task, self.site), device)
        task.set_weights(dict(zip(ordered_names(task), parameters)), source="global model from the server")
        return task, round_

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict]:
        task, round_ = self._task(parameters, config)
        data = cached_site_data(self.site.data_path, task.config, self.site.state_dir)
        metrics = train_site_round(
            task, data, self.site, round_.privacy,
            planned_rounds=round_.planned_rounds, study_id=round_.study_id,
            seed=site_seed(task.config.seed, round_.server_round, self.site.data_path),
            server_round=round_.server_round,
        )
        weights = task.get_weights()
        check_arrays(weights, task.weight_shapes(), "local update")
        sent = outgoing_train_metrics(task, metrics, round_.privacy.enabled)  # the plain path's release rule
        return [weights[n] for n in ordered_names(task)], data.num_train, {**sent, **self._name()}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict]:
        task, _ = self._task(parameters, config)
        data = cached_site_data(self.site.data_path, task.config, self.site.state_dir)
        scores = task.evaluate(data) if self.site.release_test_metrics else {}
        metrics = outgoing_eval_metrics(task, scores, self.site)
        # the legacy API wants a "loss": the task's headline score where the site releases it
        return float(metrics.get(task.headline_metric, 0.0)), int(data.test.shape[0]), {**metrics, **self._name()}

    def _name(self) -> dict[str, Scalar]:
        """The site's name, as the plain path's replies carry it (none: the coordinator uses the node id)."""
        return {LEGACY_SITE_NAME_KEY: self.site.announced_name} if self.site.announced_name else {}


def build_secagg_client_app(sites: Sequence[SiteConfig] | None = None) -> ClientApp:
    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return SiteNumPyClient(site_from_context(context.node_config, context.run_config, sites)).to_client()

    # The audit sits inside SecAgg+'s mod: it sees the update and metrics before they are masked.
    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod, audit_legacy_mod])
