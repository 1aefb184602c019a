"""GAN-aware FedAvg over parameter groups, with a per-round log of what each site sent.

Flower's FedAvg accepts exactly one ArrayRecord per reply, so a GAN's networks travel
together with prefixed names (``generator.…``, ``discriminator.…``). This strategy
checks every reply against the names and shapes the sites share (local groups and
FedBN's local normalisation layers never travel), leaves out sites whose arrays are wrong
or not finite, combines each group by its policy (sample-weighted mean, trimmed mean or
median), and records per-site scalar metrics for the server's metrics file.
``GroupedFedAdam``/``GroupedFedYogi`` put Flower's own FedAdam/FedYogi server optimiser
on top of that combination (Python's method order: FedAdam's ``aggregate_train`` calls
ours as its ``super()``); ``GroupedFedAvgM`` does the same with Flower's FedAvgM (server
momentum).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.supercore import log

from medgan_core.arrays import check_arrays
from medgan_core.errors import WeightsError
from medgan_core.site_label import SITE_NAME_KEY, SITE_RECORD, is_site_name, reason_site, site_label
from strategies.aggregation import aggregate_by_policy
from strategies.central_dp import CentralDP

NUM_EXAMPLES = "num-examples"


@dataclass
class SiteReply:
    """What one site sent in one round (as received, after checks)."""

    node_id: int
    num_examples: float
    metrics: dict[str, float]
    arrays: dict[str, np.ndarray] = field(repr=False)
    site: str = ""  # the name the site announced ('' : none)


@dataclass
class RoundLog:
    train: list[SiteReply] = field(default_factory=list)
    evaluate: list[SiteReply] = field(default_factory=list)
    excluded: list[dict[str, str | int]] = field(default_factory=list)
    central_noise_std: float = 0.0
    failed: str = ""  # why the round left the model unchanged, if it did
    waited: str = ""  # fewer sites than required were connected when the bounded wait ended


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


class GroupedFedAvg(FedAvg):
    """FedAvg that combines each parameter group by its policy and logs every site's reply.

    ``expected_shapes`` are the arrays the sites send (the model minus its local arrays);
    the aggregate keeps the current global values of every other array.
    """

    def __init__(
        self,
        groups: Sequence[str] = (),
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        *,
        policies: Mapping[str, str] | None = None,
        trim_fraction: float = 0.2,
        on_train_replies: Callable[[int, list[Message]], None] | None = None,
        central_noise_multiplier: float = 0.0,
        central_clipping_norm: float = 10.0,
        central_seed: int | None = None,
        min_answer_fraction: float = 0.0,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.setup_groups(
            groups, expected_shapes, policies=policies, trim_fraction=trim_fraction,
            on_train_replies=on_train_replies, central_noise_multiplier=central_noise_multiplier,
            central_clipping_norm=central_clipping_norm, central_seed=central_seed,
            min_answer_fraction=min_answer_fraction,
        )

    def setup_groups(
        self,
        groups: Sequence[str],
        expected_shapes: Mapping[str, tuple[int, ...]] | None,
        *,
        policies: Mapping[str, str] | None = None,
        trim_fraction: float = 0.2,
        on_train_replies: Callable[[int, list[Message]], None] | None = None,
        central_noise_multiplier: float = 0.0,
        central_clipping_norm: float = 10.0,
        central_seed: int | None = None,
        min_answer_fraction: float = 0.0,
    ) -> None:
        """The grouped settings (separate from ``__init__`` so FedOpt subclasses can take them too)."""
        self.groups = list(groups)
        self.expected_shapes = dict(expected_shapes or {})
        self.policies = dict(policies or {})
        self.trim_fraction = trim_fraction
        self.on_train_replies = on_train_replies
        self.central = (
            CentralDP(central_noise_multiplier, central_clipping_norm, central_seed)
            if central_noise_multiplier > 0
            else None
        )
        self.min_answer_fraction = min_answer_fraction
        # Bounded waits for sites to be connected (Flower's own sampling waits forever):
        # the first round waits up to ``first_node_wait`` for the federation to assemble,
        # later rounds ``node_wait`` for a site that dropped out to come back.
        self.first_node_wait, self.node_wait = 3600.0, 60.0
        self._waited_once = False
        self.rounds: dict[int, RoundLog] = {}
        self._current: dict[str, np.ndarray] = {}
        self._sampled: set[int] = set()
        #: The name each node announced in its replies (``reply_site_name``), kept for the study:
        #: a site that goes silent in a later round is still named.
        self.site_names: dict[int, str] = {}
        self._outgoing: list[Message] = []  # this round's messages; the grid fills in their ids

    # Server-optimiser state (FedAdam/FedYogi moments): plain FedAvg has none.
    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {}

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        if arrays:
            raise WeightsError("this run's server optimiser is fedavg, but the checkpoint holds server-optimiser moments")

    def set_node_waits(self, first: float, later: float) -> None:
        self.first_node_wait, self.node_wait = float(first), float(later)

    def _connected(self, server_round: int, grid: Grid) -> list[int]:
        """The connected nodes once ``min_available_nodes`` are, or when the bounded wait ends."""
        wait = self.node_wait if self._waited_once else self.first_node_wait
        self._waited_once = True
        deadline = time.monotonic() + wait
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if len(nodes) < self.min_available_nodes:
            note = f"only {len(nodes)} of {self.min_available_nodes} sites connected after waiting {wait:g} s"
            log(WARNING, "round %d: %s; going on with those", server_round, note)
            self._log(server_round).waited = note
        return nodes

    def _within_connected(self, server_round: int, grid: Grid, configure: Callable[[], Iterable[Message]]) -> list[Message]:
        """Run Flower's configure step with its node minimums capped at the connected nodes, so
        its sampling never waits past our bounded wait."""
        connected = len(self._connected(server_round, grid))
        if connected == 0:
            return []
        saved = (self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes)
        self.min_available_nodes = min(self.min_available_nodes, connected)
        self.min_train_nodes = min(self.min_train_nodes, connected)
        self.min_evaluate_nodes = min(self.min_evaluate_nodes, connected)
        try:
            return list(configure())
        finally:
            self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = saved

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays_from_record(arrays)  # the reference for central-DP clipping
        if self.central is not None:
            self.central.start_round(server_round)
        messages = self._within_connected(
            server_round, grid, lambda: super(GroupedFedAvg, self).configure_train(server_round, arrays, config, grid))
        self._sampled = {m.metadata.dst_node_id for m in messages}
        self._outgoing = messages
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._outgoing = self._within_connected(
            server_round, grid, lambda: super(GroupedFedAvg, self).configure_evaluate(server_round, arrays, config, grid))
        return self._outgoing

    def _sites_of(self, replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """Each reply with the site it is about: the node we sent the message to. An error the
        SuperLink itself writes for a lost node (e.g. "Node Unavailable") comes from the
        SuperLink's own id, so its source would name no site, or the wrong one."""
        destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outgoing if m.metadata.message_id}
        return [(destinations.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]

    def _log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog())

    def _screen(self, server_round: int, replies: Iterable[Message], with_arrays: bool) -> list[SiteReply]:
        """Keep replies that carry the expected content; log and drop the rest."""
        accepted = []
        for node, msg in self._sites_of(replies):
            if name := reply_site_name(msg):
                self.site_names[node] = name
            if msg.has_error():
                self._exclude(server_round, node, f"site error: {reason_site(error_reason(msg))[1]}")
                continue
            content = msg.content
            try:
                if len(content.metric_records) != 1:
                    raise WeightsError(f"expected one metric record, got {len(content.metric_records)}")
                metrics = dict(next(iter(content.metric_records.values())))
                if NUM_EXAMPLES not in metrics or not float(metrics[NUM_EXAMPLES]) > 0:
                    raise WeightsError(f"metric '{NUM_EXAMPLES}' is missing or not positive")
                arrays: dict[str, np.ndarray] = {}
                if with_arrays:
                    if len(content.array_records) != 1:
                        raise WeightsError(f"expected one array record, got {len(content.array_records)}")
                    arrays = arrays_from_record(next(iter(content.array_records.values())))
                    check_arrays(arrays, self.expected_shapes, f"update from node {node}")
            except WeightsError as exc:
                self._exclude(server_round, node, str(exc))
                continue
            num_examples = float(metrics.pop(NUM_EXAMPLES))
            accepted.append(SiteReply(node, num_examples, {k: float(v) for k, v in metrics.items()}, arrays,
                                      self.site_names.get(node, "")))
        return accepted

    def _exclude(self, server_round: int, node: int, reason: str) -> None:
        """Record that ``node`` is left out of this round: once, with the first reason (a site
        that failed training usually fails evaluation the same way)."""
        excluded = self._log(server_round).excluded
        if any(entry["node"] == node for entry in excluded):
            return
        name = self.site_names.get(node, "")
        log(WARNING, "round %d: leaving out %s: %s", server_round, site_label(node, name), reason)
        excluded.append({"node": node, **({"site": name} if name else {}), "reason": reason})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.on_train_replies is not None:  # audit hook: the replies exactly as received
            self.on_train_replies(server_round, replies)
        for node in sorted(self._sampled - {node for node, _ in self._sites_of(replies)}):
            self._exclude(server_round, node, "no reply before the round timeout")
        accepted = sorted(self._screen(server_round, replies, with_arrays=True), key=_content_key)
        self._log(server_round).train = accepted
        needed = max(1, math.ceil(self.min_answer_fraction * len(self._sampled)))
        if len(accepted) < needed:
            log(WARNING, "round %d: only %d of %d sites answered usefully (need %d); the model stays as it was",
                server_round, len(accepted), len(self._sampled), needed)
            self._log(server_round).failed = f"only {len(accepted)} of {len(self._sampled)} sites answered (need {needed})"
            return None, None
        shared = {name: self._current[name] for name in self.expected_shapes}
        if self.central is not None:
            combined = self.central.aggregate([r.arrays for r in accepted], shared)
            self._log(server_round).central_noise_std = self.central.last_std
        else:
            weights = [r.num_examples for r in accepted]
            combined = aggregate_by_policy([r.arrays for r in accepted], weights, self.policies, settings=self)
        # Arrays that stay at the sites keep the server's values (the initial model).
        return record_from_arrays({**self._current, **combined}), MetricRecord(weighted_metrics(accepted))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted = self._screen(server_round, replies, with_arrays=False)
        self._log(server_round).evaluate = accepted
        return MetricRecord(weighted_metrics(accepted)) if accepted else None


class _ServerOptimizerMixin:
    """Moments of Flower's FedOpt family as named arrays, for checkpoints and resume, and
    its output cast back to the model's dtypes (Flower's arithmetic promotes to float64)."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None
    current_arrays: dict[str, np.ndarray] | None

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = {}
        for prefix, moments in (("m", self.m_t), ("v", self.v_t)):
            state.update({f"{prefix}:{name}": np.asarray(a) for name, a in (moments or {}).items()})
        return state

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        m = {k[2:]: np.asarray(v) for k, v in arrays.items() if k.startswith("m:")}
        v = {k[2:]: np.asarray(v) for k, v in arrays.items() if k.startswith("v:")}
        self.m_t, self.v_t = (m or None), (v or None)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if record is None or self.current_arrays is None:
            return record, metrics
        dtypes = {name: a.dtype for name, a in self.current_arrays.items()}
        arrays = {name: a.numpy().astype(dtypes[name]) for name, a in record.items()}
        return record_from_arrays(arrays), metrics


class GroupedFedAdam(_ServerOptimizerMixin, FedAdam, GroupedFedAvg):
    """Flower's FedAdam (Reddi et al. 2021) applied to the per-group combination."""


class GroupedFedYogi(_ServerOptimizerMixin, FedYogi, GroupedFedAvg):
    """Flower's FedYogi applied to the per-group combination."""


class GroupedFedAvgM(FedAvgM, GroupedFedAvg):
    """Flower's FedAvgM (server momentum, server learning rate 1) applied to the per-group
    combination. Arrays that stay at the sites keep the server's values, so their momentum
    stays zero. The momentum is saved by name with each round's checkpoint, for resume."""

    _pending_momentum: dict[str, np.ndarray] | None = None

    def optimizer_state(self) -> dict[str, np.ndarray]:
        if self.momentum_vector is None or self.current_arrays is None:
            return {}
        return {f"momentum:{name}": np.asarray(a)
                for name, a in zip(self.current_arrays.keys(), self.momentum_vector, strict=True)}

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        momentum = {k.split(":", 1)[1]: np.asarray(v) for k, v in arrays.items() if k.startswith("momentum:")}
        if len(momentum) != len(arrays):
            raise WeightsError("this run's server optimiser is FedAvgM, but the checkpoint holds other moments")
        self._pending_momentum = momentum or None  # ordered like the model once the first round names it

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        if self._pending_momentum is not None and self.current_arrays is not None:
            current = dict(zip(self.current_arrays.keys(), self.current_arrays.to_numpy_ndarrays(), strict=True))
            wrong = sorted(n for n, a in current.items()
                           if n not in self._pending_momentum or self._pending_momentum[n].shape != a.shape)
            if wrong:
                raise WeightsError(f"the saved server momentum lacks or misshapes {wrong[:3]}; it belongs to another model")
            self.momentum_vector = [self._pending_momentum[name] for name in self.current_arrays.keys()]
            self._pending_momentum = None
        return messages


SERVER_OPTIMIZERS: dict[str, type[GroupedFedAvg]] = {
    "fedavg": GroupedFedAvg,
    "fedadam": GroupedFedAdam,
    "fedyogi": GroupedFedYogi,
}


def build_strategy(
    server_optimizer: str,
    groups: Sequence[str],
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    optimizer_kwargs: Mapping[str, float] | None = None,
    fedavg_kwargs: Mapping[str, object] | None = None,
    server_momentum: float = 0.0,
    **grouped_kwargs: object,
) -> GroupedFedAvg:
    """A grouped strategy, with Flower's FedAdam/FedYogi on top when asked, or its FedAvgM
    for plain averaging with ``server_momentum`` > 0.

    Flower's FedOpt constructors pass only FedAvg's arguments up the chain, so the
    grouped settings are applied after construction (``setup_groups``).
    """
    try:
        cls = SERVER_OPTIMIZERS[server_optimizer]
    except KeyError:
        raise ValueError(f"unknown server optimiser {server_optimizer!r}; choose one of {sorted(SERVER_OPTIMIZERS)}") from None
    kwargs = dict(fedavg_kwargs or {})
    if cls is not GroupedFedAvg:
        kwargs.update(optimizer_kwargs or {})
    elif server_momentum > 0:
        cls = GroupedFedAvgM
        kwargs.update(server_learning_rate=1.0, server_momentum=server_momentum)
    strategy = cls(**kwargs)  # type: ignore[arg-type]
    strategy.setup_groups(groups, expected_shapes, **grouped_kwargs)  # type: ignore[arg-type]
    return strategy


def _content_key(reply: SiteReply) -> tuple[float, str]:
    """Order replies by content, not arrival or node id, so float sums are reproducible."""
    digest = hashlib.sha1()
    for name in sorted(reply.arrays):
        digest.update(np.ascontiguousarray(reply.arrays[name]).tobytes())
    return reply.num_examples, digest.hexdigest()


def weighted_metrics(replies: Sequence[SiteReply]) -> dict[str, float]:
    """Sample-weighted mean of the metrics every site reported (empty if no replies)."""
    if not replies:
        return {}
    total = sum(r.num_examples for r in replies)
    names = set.intersection(*(set(r.metrics) for r in replies))
    return {n: sum(r.metrics[n] * r.num_examples for r in replies) / total for n in sorted(names)}


def error_reason(msg: Message) -> str:
    """A failed reply's reason as one bounded line, whatever the site sent."""
    return " ".join(str(msg.error.reason).split())[:300]


def reply_site_name(msg: Message) -> str:
    """The name a reply says its site has: its ``site`` record, or the head of a failed
    reply's reason ('' when it names none, or names it in any other shape)."""
    if msg.has_error():
        return reason_site(error_reason(msg))[0]
    record = msg.content.config_records.get(SITE_RECORD)
    name = record.get(SITE_NAME_KEY) if record is not None else None
    return name if is_site_name(name) else ""
