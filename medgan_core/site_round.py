"""One site's part of one round, as plain Python: the privacy-critical path of a client.

The ClientApp calls this; tests and notebooks can too. With privacy on (the default) it
refuses models Opacus cannot train, derives the site's DP-SGD noise, checks the budget
before any step, trains, and persists the accountant before anything is sent. Under the
study's ``[aggregation]`` settings it also puts the site's local arrays (local groups,
FedBN's normalisation layers) and optimiser state back before training, saves them after,
and sends only the shared arrays (``shared_weights``). With ``finetune-steps`` it trains on
after its last round's update is fixed, accounts those steps too, and keeps that personal
model in its state folder for its own evaluation and export; without DP, the best of it on
the site's validation subjects (``finetune-validate-every``). With ``ditto-steps`` it also
trains, every round, a personal model pulled towards the global one (Ditto), accounted
like every other step, kept in its state folder and never sent.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.data.dataset import SiteData
from medgan_core.errors import ConfigError, MedGANError, PrivacyError, SitePolicyError
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.release import ReleaseStore
from medgan_core.privacy.dp_sgd import validate_private_modules
from medgan_core.privacy.planning import check_budget, plan_dp
from medgan_core.sharing import local_array_names
from medgan_core.site_state import SiteState
from medgan_core.tasks.base import LocalTraining, Task, lr_scale


log = logging.getLogger(__name__)


#: The site's earlier σ searches (``medgan_core.privacy.planning.noise_for``): time saved, each checked before use.
NOISE_PLANS = "noise-plans.json"


def accountant_path(state_dir: str | Path, study_id: str) -> Path:
    return Path(state_dir) / f"accountant-{study_id}.json"


def load_site_model(
    task: Task,
    site: SiteConfig,
    aggregation: AggregationConfig,
    *,
    study_id: str,
    server_round: int,
    training: bool,
    personal: bool = True,
) -> SiteState | None:
    """Put what this site keeps between rounds onto the global model ``task`` holds.

    For training in round r: the state saved in an earlier round (local arrays and, with
    ``keep-optimizer-state``, Adam's moments); for evaluating round r: the state round r
    left, or (``personal``) the site's personal model where that round fine-tuned one. Returns the site's
    state store (None when the study keeps nothing at sites).
    """
    local = local_array_names(task.groups, aggregation)
    task.local_training = LocalTraining(aggregation.proximal_mu, frozenset(local))
    if not aggregation.has_site_state:
        return None
    if not site.state_dir:
        raise ConfigError(
            f"site {site.site_name}: no state-dir; this study keeps local weights or optimiser state at each "
            "site between rounds ([aggregation])"
        )
    state = SiteState(site.state_dir, study_id)
    saved = state.latest(before=server_round if training else server_round + 1)
    if saved is None:
        return state
    own = saved.personal_for(server_round, every_round=aggregation.ditto_steps > 0)
    if personal and not training and own is not None:
        task.set_weights(own, source=f"this site's personal model in {state.path(saved.server_round)}")
        return state
    if local:
        missing = sorted(local - set(saved.local))
        if missing:
            raise ConfigError(
                f"site state {state.path(saved.server_round)} lacks local arrays {missing[:3]}; it belongs "
                "to another model or aggregation setting"
            )
        weights = task.get_weights()
        weights.update({name: saved.local[name] for name in local})
        task.set_weights(weights, source=f"site state {state.path(saved.server_round)}")
    if training and aggregation.keep_optimizer_state:
        task.load_optimizer_state(saved.optimizer)
    return state


def shared_weights(task: Task, aggregation: AggregationConfig) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """The arrays this site sends and their shapes: everything but its local arrays."""
    local = local_array_names(task.groups, aggregation)
    weights = {k: v for k, v in task.get_weights().items() if k not in local}
    shapes = {k: v for k, v in task.weight_shapes().items() if k not in local}
    return weights, shapes


def train_site_round(
    task: Task,
    data: SiteData,
    site: SiteConfig,
    privacy: PrivacyConfig,
    *,
    planned_rounds: int,
    study_id: str,
    seed: int,
    aggregation: AggregationConfig | None = None,
    server_round: int = 1,
    validation: Callable[[], SiteData | None] | None = None,
) -> dict[str, float]:
    """Train ``task`` (holding the global model) locally for one round; return the scalar
    metrics the site may send. Afterwards ``shared_weights`` gives the arrays to send.
    ``validation`` reads the site's validation subjects (None: it has none) when a
    fine-tune without DP chooses its model by them; nothing computed on them is sent."""
    aggregation = aggregation or AggregationConfig()
    if refusal := site.refusal(privacy):  # the site's own policy: the study may not lower it
        raise PrivacyError(refusal)
    finetune = aggregation.finetune_steps if server_round == planned_rounds else 0
    if refusal := site.work_refusal(task.config, finetune, aggregation.ditto_steps):  # refused before any step runs
        raise SitePolicyError(refusal)
    state = load_site_model(task, site, aggregation, study_id=study_id, server_round=server_round, training=True)
    task.local_training = dataclasses.replace(
        task.local_training, lr_scale=lr_scale(task.config.lr_schedule, server_round, planned_rounds))
    received = task.get_weights() if aggregation.ditto_steps > 0 else {}
    if not privacy.enabled:
        metrics = task.train(data, task.config.local_steps, seed)
        held_out = _validation_for(task, aggregation, finetune, validation, site.site_name)
        personal = _finetune(task, data, finetune, seed, held_out=held_out,
                             every=aggregation.finetune_validate_every, site_name=site.site_name)
        if aggregation.ditto_steps > 0:
            personal = _ditto(task, data, aggregation, state, server_round, received, seed)
        _save_state(task, state, aggregation, server_round, *personal)
        return {**metrics, "dp": 0.0}
    steps = task.config.local_steps
    if refusal := task.config.params.dp_refusal(privacy.unit):
        raise PrivacyError(f"site {site.site_name}: {refusal}")
    if not site.state_dir:
        raise ConfigError(f"site {site.site_name}: no state-dir; differential privacy needs one to keep its accountant")
    validate_private_modules(task.private_modules)
    accountant = SiteAccountant(privacy.accountant, privacy.delta, accountant_path(site.state_dir, study_id))
    releases = ReleaseStore(site.state_dir, study_id)
    if server_round in accountant.released:  # asked again (a coordinator restart): the same update, no new charge
        arrays, metrics = releases.load(server_round, accountant.released[server_round])
        task.set_weights({**task.get_weights(), **arrays}, source=f"this site's release of round {server_round}")
        return metrics
    records = task.dp_records(data, privacy.unit)  # slices, or patients (privacy.unit)
    if privacy.delta > 1 / records:
        log.warning("site %s: δ = %g is above 1/N = %g for its %d training records (%ss); a δ this large allows "
                    "a rare full disclosure of a record", site.site_name, privacy.delta, 1 / records, records,
                    privacy.unit)
    budget = site.budget(privacy)
    k = task.dp_releases_per_step
    # Noise planned for the stricter of the study's target and the site's own budget, so a
    # stricter site still trains every planned round rather than stopping part-way.
    ditto = aggregation.ditto_steps
    dp = plan_dp(privacy, records, task.config.batch_size,
                 planned_rounds * (steps + ditto) + aggregation.finetune_steps, k, epsilon=min(budget, privacy.target_epsilon),
                 plans=Path(site.state_dir) / NOISE_PLANS)
    check_budget(accountant, dp, steps + ditto + finetune, budget, site.site_name, k)
    metrics = task.train(data, steps, seed, dp=dp, accountant=accountant)
    personal = _finetune(task, data, finetune, seed, dp=dp, accountant=accountant)  # accounted like every step
    if ditto > 0:  # the personal model's steps read the site's images too: accounted alike
        personal = _ditto(task, data, aggregation, state, server_round, received, seed, dp=dp, accountant=accountant)
    _save_state(task, state, aggregation, server_round, *personal)
    metrics = {
        **metrics,
        "dp": 1.0,
        "epsilon": accountant.epsilon(),
        "epsilon-budget": budget,
        "delta": privacy.delta,
        "noise-multiplier": dp.noise_multiplier,
        "max-grad-norm": dp.max_grad_norm,
        "sample-rate": dp.sample_rate,
        "dp-steps": float(accountant.steps),
    }
    shared, _ = shared_weights(task, aggregation)
    # Kept, then accounted (the ledger names its digest), and only then sent: a crash
    # before the accountant is saved leaves an unaccounted copy that is never re-sent.
    accountant.released[server_round] = releases.save(server_round, shared, metrics)
    accountant.save()
    releases.prune()
    return metrics


def _validation_for(task: Task, aggregation: AggregationConfig, steps: int,
                    validation: Callable[[], SiteData | None] | None, site_name: str) -> SiteData | None:
    """The validation subjects a fine-tune without DP chooses its model by, where the study
    asks for it, the task can score them and the site has some."""
    if steps <= 0 or aggregation.finetune_validate_every <= 0 or validation is None or not task.validates:
        return None
    try:
        held_out = validation()
    except MedGANError as exc:  # the round's update is ready: an unreadable val split must not cost it
        log.warning("site %s: its validation subjects cannot be read (%s); the personal fine-tune keeps its "
                    "last model", site_name, exc)
        return None
    if held_out is None:
        log.info("site %s: no validation subjects; the personal fine-tune keeps its last model", site_name)
    return held_out


def _finetune(task: Task, data: SiteData, steps: int, seed: int, *, held_out: SiteData | None = None,
              every: int = 0, site_name: str = "", **dp: object) -> tuple[dict[str, np.ndarray] | None, int]:
    """Train ``steps`` more on the site's own data from the model the round just trained, and
    return that personal model and the steps it took; ``task`` is left holding the round's
    model, the one it sends. With ``held_out`` (never under DP) the model is scored on it
    before the first step and every ``every`` steps, and the best scored is the personal
    model (early stopping)."""
    if steps <= 0:
        return None, 0
    sent = task.get_weights()
    if held_out is None:
        task.train(data, steps, seed + FINETUNE_SEED_OFFSET, **dp)  # type: ignore[arg-type]
        personal, kept = task.get_weights(), steps
    else:
        personal, kept = best_on_validation(task, data, steps, every, seed, held_out, site_name)
    task.set_weights(sent, source="this round's update")
    return personal, kept


def best_on_validation(task: Task, data: SiteData, steps: int, every: int, seed: int, held_out: SiteData,
                        site_name: str) -> tuple[dict[str, np.ndarray], int]:
    """Fine-tune in parts of ``every`` steps (Adam's state carries over; a ``task.ema``
    average restarts with each part) and keep the model with the best ``validation_score``,
    the round's own model included; it and its step count."""
    best, best_score, best_steps = task.get_weights(), task.validation_score(held_out), 0
    scores = [f"0: {best_score:.3f}"]
    done = 0
    for part, start in enumerate(range(0, steps, every)):
        length = min(every, steps - start)
        task.train(data, length, seed + FINETUNE_SEED_OFFSET + part)
        done += length
        score = task.validation_score(held_out)
        scores.append(f"{done}: {score:.3f}")
        if score > best_score:
            best, best_score, best_steps = task.get_weights(), score, done
    log.info("site %s: personal fine-tune keeps its model after %d of %d steps (validation %s by steps: %s)",
             site_name, best_steps, steps, task.headline_metric, ", ".join(scores))
    return best, best_steps


#: The fine-tune draws its batches from another stream than the round's own steps.
FINETUNE_SEED_OFFSET = 7919
#: So does the Ditto personal model.
DITTO_SEED_OFFSET = 104729


def _ditto(task: Task, data: SiteData, aggregation: AggregationConfig, state: SiteState | None, server_round: int,
           received: dict[str, np.ndarray], seed: int, **dp: object) -> tuple[dict[str, np.ndarray], int]:
    """Ditto's personal model after this round: from where the site's last round left it
    (the global model the site received, the first time), ``ditto-steps`` on the site's own
    data with a fresh Adam, every step pulled ``lr × ditto-lambda`` towards ``received``. ``task`` is left
    holding the round's update, the one it sends; the personal model is returned with its
    steps, to be kept in the state folder."""
    assert state is not None  # ditto-steps > 0 keeps state at the site (has_site_state)
    saved = state.latest(before=server_round)
    sent, training, moments = task.get_weights(), task.local_training, task.optimizer_state()
    if saved is not None and saved.personal:  # names and shapes checked: a state of another model is refused
        task.set_weights(saved.personal, source=f"this site's Ditto personal model in {state.path(saved.server_round)}")
    else:
        task.set_weights(received, source="the global model this round received")
    task.local_training = dataclasses.replace(training, proximal_mu=aggregation.ditto_lambda,
                                              proximal_exclude=frozenset(), anchor=received)
    task.load_optimizer_state({})  # fresh Adam: the round's moments belong to the model it sends
    try:
        task.train(data, aggregation.ditto_steps, seed + DITTO_SEED_OFFSET, **dp)  # type: ignore[arg-type]
        personal = task.get_weights()
    finally:
        task.local_training = training
        task.set_weights(sent, source="this round's update")
        task.load_optimizer_state(moments)  # what keep-optimizer-state saves is the sent model's
    return personal, aggregation.ditto_steps


def _save_state(task: Task, state: SiteState | None, aggregation: AggregationConfig, server_round: int,
                personal: dict[str, np.ndarray] | None = None, personal_steps: int = 0) -> None:
    """Keep the site's local arrays and optimiser state for the next round (before replying),
    and its personal model (and the fine-tune steps it took) after its last round."""
    if state is None:
        return
    local = local_array_names(task.groups, aggregation)
    weights = task.get_weights()
    optimizer = task.optimizer_state() if aggregation.keep_optimizer_state else {}
    state.save(server_round, {name: weights[name] for name in sorted(local)}, optimizer, personal, personal_steps)


#: What the privacy design lets a DP site send from training: bookkeeping of the mechanism
#: itself (public settings and ε), nothing computed from its images.
PRIVACY_METRICS = frozenset({"dp", "epsilon", "epsilon-budget", "delta", "noise-multiplier", "max-grad-norm",
                             "sample-rate", "dp-steps"})


def outgoing_train_metrics(task: Task | type[Task], metrics: dict[str, float], private: bool) -> dict[str, float]:
    """The training scalars a site sends. Under DP only ``PRIVACY_METRICS``: losses and D
    scores are functions of the site's images outside the DP-SGD mechanism, so they stay
    in the site's log; without DP the task's declared ``train_metrics`` too."""
    allowed = PRIVACY_METRICS if private else PRIVACY_METRICS | task.train_metrics
    return {k: v for k, v in metrics.items() if k in allowed}


def outgoing_eval_metrics(task: Task | type[Task], metrics: dict[str, float], site: SiteConfig) -> dict[str, float]:
    """Held-out scores leave only where the site's policy allows it (``release-test-metrics``):
    they are computed from its test patients, whom ε (of the training records) does not cover."""
    if not site.release_test_metrics:
        return {}
    return {k: v for k, v in metrics.items() if k in task.eval_metrics}
