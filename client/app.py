"""The hospital side of a federation: a Flower ClientApp over medgan_core.

Each round it receives the global weights and the task config, trains on the site's
own images, and replies with weights and scalar metrics only (see ``client.payload``).
"""

from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (imported at top so Ray workers have torch before unpickling)
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.payload import evaluate_reply, train_reply
from client.site import cached_site_data, resolve_data_path, site_seed
from medgan_core.config import task_config_from_flat
from medgan_core.runtime import resolve_device
from medgan_core.tasks import Task, build_task


def build_client_app(site_paths: Sequence[str] | None = None) -> ClientApp:
    """A ClientApp; ``site_paths`` maps simulated partition ids to site folders.

    Without it (``flwr run .`` or a deployed SuperNode) the data path comes from the
    node config (``data-path``) or, in simulation, from ``run.sites-dir``.
    """
    app = ClientApp()

    def data_path_of(context: Context) -> str:
        if site_paths is not None and "partition-id" in context.node_config:
            return str(site_paths[int(context.node_config["partition-id"])])  # type: ignore[arg-type]
        return str(resolve_data_path(context.node_config, context.run_config))

    def prepare(msg: Message, context: Context) -> tuple[Task, str, int]:
        config = msg.content["config"]
        task_config = task_config_from_flat(dict(config))
        # The site's own node config wins over the study's device hint.
        device = resolve_device(str(context.node_config.get("device", config.get("device", "auto"))))
        task = build_task(task_config, device)
        arrays: ArrayRecord = msg.content["arrays"]
        task.set_weights({k: v.numpy() for k, v in arrays.items()}, source="global model from the server")
        return task, data_path_of(context), int(config.get("server-round", 0))  # type: ignore[arg-type]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task, data_path, server_round = prepare(msg, context)
        data = cached_site_data(data_path, task.config)
        seed = site_seed(task.config.seed, server_round, data_path)
        metrics = task.train(data, task.config.local_steps, seed)
        content = train_reply(task.get_weights(), task.weight_shapes(), metrics, data.num_train)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        task, data_path, _ = prepare(msg, context)
        data = cached_site_data(data_path, task.config)
        return Message(content=evaluate_reply(task.evaluate(data), int(data.test.shape[0])), reply_to=msg)

    return app


app = build_client_app()
