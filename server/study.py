"""One federated study, round by round, on any Flower Grid (simulated or deployed).

Per round: send the global weights to the sites, combine their updates per parameter
group by the study's ``[aggregation]`` policies (and FedAdam/FedYogi when asked), have
every site evaluate the new global model (plus its own local arrays) on its held-out
split, then write a checkpoint, the server optimiser's moments, a sample grid and one
metrics line. Round 0 evaluates the initial model so the report shows what training bought.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from math import ceil
from typing import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from medgan_core.study_config import StudyConfig
from medgan_core.errors import MedGANError
from medgan_core.round_instructions import RoundInstructions
from medgan_core.privacy.dp_sgd import validate_private_modules
from medgan_core.sharing import local_array_names
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task
from server.warm_start import start_from_initial_model
from server.report import write_report
from server.run_folder import RunFolder
from server.samples import save_grid
from server.tracking import NoTracking, Tracker, open_tracker
from medgan_core.checkpoints import load_checkpoint, save_checkpoint
from medgan_core.site_label import reason_site
from strategies.aggregation import split_groups
from strategies.grouped_fedavg import (
    GroupedFedAvg,
    RoundLog,
    arrays_from_record,
    build_strategy,
    error_reason,
    reply_site_name,
    record_from_arrays,
    weighted_metrics,
)



NODE_RETURN_WAIT = 60.0  # seconds a round waits for a site that dropped out to reconnect


class StudyFailed(MedGANError):
    """A study ran to its end without one round that updated the model."""


@dataclass
class RoundSummary:
    """What a progress display needs after each round."""

    server_round: int
    rounds: int
    seconds: float
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    sites_ok: int = 0
    excluded: list[dict[str, str | int]] = field(default_factory=list)


@dataclass(frozen=True)
class SiteEvent:
    """One site's state within a round, as it changes (a live display's input): ``working``
    when the round's message is sent to it, then ``done``, ``failed`` (with the site's one-line
    reason) or ``no answer`` (when the round's wait ends without its reply)."""

    server_round: int
    phase: str  # "train" or "evaluate"
    node: int
    state: str
    detail: str = ""
    site: str = ""  # the name the site's reply announced ('' : none, or no reply yet)


SiteWatcher = Callable[[SiteEvent], None]


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float, server_round: int, phase: str,
             watch: SiteWatcher | None = None) -> list[Message]:
    """``grid.send_and_receive``, telling ``watch`` about each site as its reply arrives."""
    if watch is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    node_of = {msg_id: msg.metadata.dst_node_id for msg_id, msg in zip(ids, messages)}
    for node in node_of.values():
        watch(SiteEvent(server_round, phase, node, "working"))
    waiting, replies = set(ids), []
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(waiting):
            msg_id = reply.metadata.reply_to_message_id
            if msg_id not in waiting:
                continue
            waiting.discard(msg_id)
            replies.append(reply)
            name = reply_site_name(reply)
            if reply.has_error():
                watch(SiteEvent(server_round, phase, node_of[msg_id], "failed",
                                reason_site(error_reason(reply))[1], name))
            else:
                watch(SiteEvent(server_round, phase, node_of[msg_id], "done", site=name))
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(PULL_INTERVAL_S)
    for msg_id in waiting:
        watch(SiteEvent(server_round, phase, node_of[msg_id], "no answer", f"no reply within {timeout:g} s"))
    return replies


PULL_INTERVAL_S = 0.2  # how often a watched round asks for replies (the grid's own loop sleeps as long)


def run_study(
    grid: Grid,
    study: StudyConfig,
    folder: RunFolder,
    *,
    progress: Callable[[RoundSummary], None] | None = None,
    on_train_replies: Callable[[int, list[Message]], None] | None = None,
    watch: SiteWatcher | None = None,
) -> dict[str, np.ndarray]:
    """Run every round of ``study`` and return the final global weights.

    With ``run.resume`` the run in ``folder`` continues after its last complete round,
    with the same study id (the sites' accountants go on) and the same seeds per round,
    so on CPU with seeded noise it ends with the weights an uninterrupted run has.
    """
    with folder.lock():  # one run per folder: a second is refused, not interleaved
        return _run_study(grid, study, folder, progress, on_train_replies, watch)


def _run_study(
    grid: Grid,
    study: StudyConfig,
    folder: RunFolder,
    progress: Callable[[RoundSummary], None] | None,
    on_train_replies: Callable[[int, list[Message]], None] | None,
    watch: SiteWatcher | None,
) -> dict[str, np.ndarray]:
    task = build_task(study.task, "cpu")  # the server holds no images: it only previews G
    if study.privacy.enabled:
        validate_private_modules(task.private_modules)  # refuse before any site trains
    strategy = _strategy(study, task, on_train_replies)
    # Every wait is bounded: the federation may take the round timeout to assemble; a site
    # lost later is waited for at most a minute before the round goes on without it.
    strategy.set_node_waits(study.run.round_timeout, min(NODE_RETURN_WAIT, study.run.round_timeout))
    if study.run.resume:
        last_round, resumed = folder.resume_point()
        task.set_weights(resumed, source=f"checkpoint of round {last_round}")
        if last_round > 0 and study.aggregation.has_server_state:  # FedAdam/FedYogi moments, FedAvgM momentum
            strategy.load_optimizer_state(load_checkpoint(folder.server_optimizer(last_round))[0])
        first_round = last_round + 1
    else:
        start_from_initial_model(task, study)  # before the folder starts: a bad starting model leaves nothing behind
        folder.start(study)
        first_round = 0
    tracker = open_tracker(study.run.tracking, folder.root)  # in the started folder, before any round
    try:
        _rounds(grid, study, folder, task, strategy, first_round, progress, watch, tracker)
    finally:
        tracker.close()
    write_report(folder, study)
    trained = [strategy.rounds.get(r) for r in range(max(first_round, 1), study.run.rounds + 1)]
    if trained and not any(log is not None and log.train and not log.failed for log in trained):
        raise StudyFailed(f"the study ended without one usable round: no round updated the model (too few sites "
                          f"sent a usable update; reasons in {folder.metrics})")
    return task.get_weights()


def _rounds(grid: Grid, study: StudyConfig, folder: RunFolder, task: Task, strategy: GroupedFedAvg, first_round: int,
            progress: Callable[[RoundSummary], None] | None, watch: SiteWatcher | None, tracker: Tracker) -> None:
    """Every round from ``first_round`` on; ``task`` ends holding the last round's global weights."""
    round_config = ConfigRecord(round_config_items(study, folder))
    arrays = record_from_arrays(task.get_weights())
    timeout = study.run.round_timeout

    for server_round in range(first_round, study.run.rounds + 1):
        started = time.monotonic()
        previous = arrays_from_record(arrays)
        if server_round > 0:
            replies = exchange(grid, strategy.configure_train(server_round, arrays, ConfigRecord(dict(round_config)), grid),
                               timeout=timeout, server_round=server_round, phase="train", watch=watch)
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
        evaluating = study.run.evaluates(server_round)
        if evaluating:
            replies = exchange(grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(round_config)),
                                                                 grid),
                               timeout=timeout, server_round=server_round, phase="evaluate", watch=watch)
            strategy.aggregate_evaluate(server_round, replies)
        current = arrays_from_record(arrays)
        if server_round > 0 and study.aggregation.has_server_state:  # before the round counts as done
            save_checkpoint(folder.server_optimizer(server_round), strategy.optimizer_state(), {"round": server_round})
        summary = record_round(study, folder, task, server_round, current, previous, strategy.rounds.get(server_round),
                               preview=evaluating, tracker=tracker)
        summary.seconds = time.monotonic() - started
        if progress is not None:
            progress(summary)


def _strategy(
    study: StudyConfig, task: Task, on_train_replies: Callable[[int, list[Message]], None] | None
) -> GroupedFedAvg:
    """The study's strategy; it expects from each site the arrays that are not local."""
    agg = study.aggregation
    policies = agg.policies(list(task.groups))
    local = local_array_names(task.groups, agg)
    min_sites = max(1, ceil(study.run.fraction_train * study.run.num_sites))
    return build_strategy(
        agg.server_optimizer,
        list(task.groups),
        {name: shape for name, shape in task.weight_shapes().items() if name not in local},
        optimizer_kwargs={"eta": agg.server_lr, "beta_1": agg.server_beta1, "beta_2": agg.server_beta2,
                          "tau": agg.server_tau},
        server_momentum=agg.server_momentum,
        fedavg_kwargs={"fraction_train": study.run.fraction_train, "fraction_evaluate": 1.0,
                       "min_train_nodes": min_sites, "min_evaluate_nodes": min_sites,
                       "min_available_nodes": study.run.num_sites},
        policies={g: p for g, p in policies.items() if p != "local"},
        trim_fraction=agg.trim_fraction,
        on_train_replies=on_train_replies,
        central_noise_multiplier=study.privacy.central_noise_multiplier,
        central_clipping_norm=study.privacy.central_clipping_norm,
        central_seed=None if study.privacy.secure_rng else study.task.seed,
        min_answer_fraction=study.run.min_answer_fraction,
    )


def round_config_items(study: StudyConfig, folder: RunFolder) -> dict[str, object]:
    """What every site must know each round (``RoundInstructions``): task, privacy and
    aggregation settings (not the run's paths), the planned rounds, the study id."""
    return RoundInstructions.for_study(study, folder.study_id())


def record_round(
    study: StudyConfig,
    folder: RunFolder,
    task: Task,
    server_round: int,
    current: dict[str, np.ndarray],
    previous: dict[str, np.ndarray],
    log: RoundLog | None,
    preview: bool = True,
    tracker: Tracker | None = None,
) -> RoundSummary:
    """Checkpoint, metrics line and (with ``preview``) the sample grid of a finished round;
    then the same to ``tracker``."""
    log = log or RoundLog()
    task.set_weights(current, source=f"aggregate of round {server_round}")
    checkpoint = save_checkpoint(
        folder.checkpoint(server_round), current, {"round": server_round, "study": study.to_dict()}
    )
    samples = (save_grid(task.preview(task.preview_count), folder.samples(server_round), columns=task.preview_columns)
               if preview else None)
    summary = RoundSummary(
        server_round=server_round,
        rounds=study.run.rounds,
        seconds=0.0,
        train=weighted_metrics(log.train),
        evaluate=weighted_metrics(log.evaluate),
        sites_ok=len(log.train) if server_round > 0 else len(log.evaluate),
        excluded=log.excluded,
    )
    sites: dict[int, dict[str, object]] = {}
    for kind, replies in (("train", log.train), ("evaluate", log.evaluate)):
        for reply in replies:
            entry = sites.setdefault(reply.node_id, {"node": reply.node_id, **({"site": reply.site} if reply.site else {})})
            entry[kind] = reply.metrics
            entry[f"{kind}-examples"] = reply.num_examples
    record = {
        "round": server_round,
        "train": summary.train,
        "evaluate": summary.evaluate,
        "sites": list(sites.values()),
        "excluded": log.excluded,
        "central-noise-std": log.central_noise_std,
        "round-failed": log.failed,
        **({"sites-connected": log.waited} if log.waited else {}),
        "update-norm": _update_norms(current, previous),
        "checkpoint": str(checkpoint.relative_to(folder.root)),
        **({"samples": str(samples.relative_to(folder.root))} if samples is not None else {}),
    }
    folder.append_metrics(record)
    (tracker or NoTracking()).log_round(record, samples)
    return summary


def _update_norms(current: dict[str, np.ndarray], previous: dict[str, np.ndarray]) -> dict[str, float]:
    """L2 norm of this round's change to each group: zero means nothing was learned."""
    now, before = split_groups(current), split_groups(previous)
    return {
        group: float(np.sqrt(sum(np.sum((arrays[k] - before[group][k]) ** 2) for k in arrays)))
        for group, arrays in now.items()
    }
