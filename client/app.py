"""The hospital side of a federation: a Flower ClientApp over medgan_core.

Each round it receives the global weights, the task, privacy and aggregation settings,
puts back what the site keeps between rounds (local groups, FedBN's normalisation layers,
optimiser state), trains on the site's own images (DP-SGD by default, see
``medgan_core.site_round``), and replies with its shared weights and scalar metrics only
(see ``client.payload``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch  # noqa: F401  (imported at top so Ray workers have torch before unpickling)
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.audit import audit_outgoing_mod
from client.payload import evaluate_reply, train_reply
from client.ray_guard import keep_ray_on_loopback, ray_exposure
from client.site import cached_site_data, site_from_context, site_seed, site_task, site_validation_data
from medgan_core.config import SiteConfig
from medgan_core.errors import PrivacyError
from medgan_core.round_instructions import RoundInstructions
from medgan_core.runtime import resolve_device
from medgan_core.site_label import is_site_name
from client.site_errors import site_error_reply
from medgan_core.site_round import (
    load_site_model,
    outgoing_eval_metrics,
    outgoing_train_metrics,
    shared_weights,
    train_site_round,
)
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task


log = logging.getLogger("medgan.site")

# Flower's simulation (`flwr run`) loads the ClientApp in its own process before it starts
# Ray: from here on, that Ray binds 127.0.0.1 only. A SuperNode runs no Ray; nothing changes.
keep_ray_on_loopback()


def build_client_app(sites: Sequence[SiteConfig] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp; ``sites`` maps simulated partition ids to site settings.

    Without it (``flwr run .`` or a deployed SuperNode) the site comes from the node
    config (``data-path`` …) or, in simulation, from ``run.sites-dir``. Extra Flower
    ``mods`` wrap the app outside the outgoing audit, which always runs last.
    """
    app = ClientApp(mods=[*mods, audit_outgoing_mod])  # every reply is audited before it leaves

    def prepare(msg: Message, context: Context) -> tuple[Task, SiteConfig, RoundInstructions]:
        if refusal := ray_exposure():  # before any image is read
            raise PrivacyError(refusal)
        round_ = RoundInstructions.from_flat(dict(msg.content["config"]))  # parsed once, typed
        site = site_from_context(context.node_config, context.run_config, sites)
        # A site's own device setting wins; "auto" follows the study's hint (run.device).
        device = resolve_device(site.device if site.device != "auto" else round_.device)
        task = build_task(site_task(round_.task, site), device)
        arrays: ArrayRecord = msg.content["arrays"]
        task.set_weights({k: v.numpy() for k, v in arrays.items()}, source="global model from the server")
        return task, site, round_

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            return _train(msg, context)
        except Exception as exc:  # noqa: BLE001 - one line leaves, the traceback stays in the site's log
            return site_error_reply(msg, exc, announced_name(context, sites))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            return _evaluate(msg, context)
        except Exception as exc:  # noqa: BLE001
            return site_error_reply(msg, exc, announced_name(context, sites))

    def _train(msg: Message, context: Context) -> Message:
        task, site, round_ = prepare(msg, context)
        data = cached_site_data(site.data_path, task.config, site.state_dir)
        metrics = train_site_round(
            task, data, site, round_.privacy,
            planned_rounds=round_.planned_rounds,
            study_id=round_.study_id,
            seed=site_seed(task.config.seed, round_.server_round, site.data_path),
            aggregation=round_.aggregation,
            server_round=round_.server_round,
            validation=lambda: site_validation_data(site.data_path, task.config, site.state_dir),
        )
        log.info("site %s, round %d, trained: %s", site.site_name, round_.server_round, _rounded(metrics))
        weights, shapes = shared_weights(task, round_.aggregation)  # local arrays stay here
        sent = outgoing_train_metrics(task, metrics, round_.privacy.enabled)
        content = train_reply(weights, shapes, sent, data.num_train, site.announced_name)
        return Message(content=content, reply_to=msg)

    def _evaluate(msg: Message, context: Context) -> Message:
        task, site, round_ = prepare(msg, context)
        load_site_model(  # a site evaluates its own model: the global one plus its local arrays
            task, site, round_.aggregation, study_id=round_.study_id, server_round=round_.server_round,
            training=False,
        )
        data = cached_site_data(site.data_path, task.config, site.state_dir)
        scores = task.evaluate(data)
        log.info("site %s, round %s, held-out scores (kept here unless release-test-metrics): %s",
                 site.site_name, round_.server_round, _rounded(scores))
        sent = outgoing_eval_metrics(task, scores, site)
        return Message(content=evaluate_reply(sent, int(data.test.shape[0]), site.announced_name), reply_to=msg)

    return app


def announced_name(context: Context, sites: Sequence[SiteConfig] | None = None) -> str:
    """The name a failed reply is headed by: the site's, as far as its settings can be read
    ('' when even they fail: the coordinator names the node)."""
    try:
        return site_from_context(context.node_config, context.run_config, sites).announced_name
    except Exception:  # noqa: BLE001 - the round's own error is the one to report
        name = context.node_config.get("site-name", "")
        return name if is_site_name(name) else ""


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in sorted(metrics.items())}


app = build_client_app()
