"""The Task contract: everything a site does for one imaging job, as plain Python.

Clients, the server and tests drive tasks only through this interface, so a task runs
the same in a federation, in a notebook, or on one machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from medgan_core.config import TaskConfig, TaskParams
from medgan_core.data.dataset import DataSpec, SiteData, Slices
from medgan_core.errors import ConfigError, PrivacyError, WeightsError
from medgan_core.models.weights import all_but_norms_and_biases, expected_shapes, group_arrays, load_group_arrays
from medgan_core.privacy.accountant import SiteAccountant
from medgan_core.privacy.dp_sgd import (
    DPSettings,
    PatientRows,
    joint_noise_multiplier,
    make_private,
    poisson_batch,
    privacy_generator,
)
from medgan_core.privacy.ghost import GhostDPOptimizer
from medgan_core.privacy.per_sample import FastConvGradSampleModule
from medgan_core.runtime import seeded


@dataclass(frozen=True)
class LocalTraining:
    """How a site trains between rounds, beyond the task's own settings.

    ``proximal_mu`` > 0 is FedProx: after every optimiser step each shared weight moves a
    fraction ``lr * mu`` back towards its value at the start of the round (a decoupled,
    data-free proximal step, as AdamW decouples weight decay). Being data-free it is
    post-processing under DP: Opacus rebuilds gradients from per-sample ones and would
    drop a proximal term added to the loss. ``proximal_exclude`` names arrays without a
    global anchor (local groups). ``anchor`` (Ditto's personal model) names the arrays the
    pull goes towards instead of the start of the training (the global model the round
    received, while the personal model starts from where it was). ``lr_scale`` multiplies
    both learning rates this round (``task.lr-schedule``, through ``lr_scale``); the pull,
    ``lr * mu``, follows it.
    """

    proximal_mu: float = 0.0
    proximal_exclude: frozenset[str] = field(default_factory=frozenset)
    lr_scale: float = 1.0
    anchor: Mapping[str, np.ndarray] | None = None


#: Where the cosine schedule ends (one round after the last planned one), as a share of the configured rates.
COSINE_FLOOR = 0.1


def lr_scale(schedule: str, server_round: int, planned_rounds: int) -> float:
    """The share of the configured learning rates round ``server_round`` (1-based) of
    ``planned_rounds`` trains at. ``cosine`` falls from 1 in round 1 along half a cosine
    towards ``COSINE_FLOOR`` (reached one round after the last): FedAvg's averaged model
    settles only when the local steps shrink, and a floor keeps the last round learning.
    Rounds past the plan (a resumed, extended study) stay at the floor."""
    if schedule == "constant" or planned_rounds <= 1:
        return 1.0
    progress = min(max(server_round - 1, 0) / planned_rounds, 1.0)
    return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


class Task(ABC):
    """Builds its networks from a TaskConfig; trains and evaluates on a site's data.

    A task owns its spec: its name, its own settings (``Params``, a ``TaskParams``
    dataclass that checks itself), the modalities it accepts, what it reads from a site
    (``data_spec``), the private groups, and every scalar it may report. Registering it is
    one line (``medgan_core.tasks.registry``).
    """

    name: ClassVar[str]
    #: The task's own ``[task]`` keys beside the shared ones (none: ``TaskParams``).
    Params: ClassVar[type[TaskParams]] = TaskParams
    #: ``task.modality`` values the task accepts (empty: any), and why, for the refusal.
    modalities: ClassVar[tuple[str, ...]] = ()
    modality_reason: ClassVar[str] = ""
    #: Parameter groups that read real images and so must train with DP-SGD.
    private_groups: ClassVar[tuple[str, ...]]
    #: Columns of the per-round sample grid (3: input | output | target).
    preview_columns: ClassVar[int] = 4
    #: How many previews (images, or input/output/target rows) a grid shows.
    preview_count: ClassVar[int] = 16
    #: Every scalar ``train`` may report (the outgoing audit allows no other name).
    train_metrics: ClassVar[frozenset[str]] = frozenset()
    #: Every scalar ``evaluate`` may report, and the one the CLI and reports lead with.
    eval_metrics: ClassVar[frozenset[str]] = frozenset()
    headline_metric: ClassVar[str] = ""
    #: Whether ``validation_score`` ranks models on a site's validation subjects (a personal
    #: fine-tune then keeps its best model; otherwise its last).
    validates: ClassVar[bool] = False
    #: What the held-out metrics mean, for the study report (a sentence or two).
    metrics_note: ClassVar[str] = ""

    @classmethod
    def note(cls) -> str:
        """``metrics_note`` (a task may build it from its own wording)."""
        return cls.metrics_note

    @classmethod
    def data_spec(cls, config: TaskConfig) -> DataSpec:
        """What to read from a site for this configuration (default: single slices)."""
        return Slices()

    @property
    def dp_releases_per_step(self) -> int:
        """Private networks updated per step on the same batch; together they are one
        release of noise multiplier σ/√k (``joint_noise_multiplier``)."""
        return len(self.private_groups)

    def __init__(self, config: TaskConfig, device: torch.device | str = "cpu") -> None:
        if type(config.params) is TaskParams:  # a bare TaskConfig(...): this task's defaults
            config = dataclasses.replace(config, params=self.Params())
        if not isinstance(config.params, self.Params):
            raise ConfigError(f"task {self.name!r} takes {self.Params.__name__}, not {type(config.params).__name__}")
        self.config = config
        self.params = config.params
        self.device = torch.device(device)
        self.local_training = LocalTraining()

    @property
    @abstractmethod
    def groups(self) -> dict[str, nn.Module]:
        """Named parameter groups, e.g. ``{"generator": G, "discriminator": D}``."""

    @abstractmethod
    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        """Run ``steps`` local optimisation steps; return scalar training metrics.

        With ``dp``, the ``private_groups`` train with DP-SGD on Poisson-sampled batches
        and every step is recorded in ``accountant``.
        """

    @abstractmethod
    def evaluate(self, data: SiteData) -> dict[str, float]:
        """Scalar quality metrics on the site's held-out split."""

    def validation_score(self, held_out: SiteData) -> float:
        """A score of the current model on ``held_out`` (higher is better) by which a
        fine-tune keeps its best model (tasks that say ``validates``)."""
        raise NotImplementedError(f"task {self.name} has no validation score")

    def unready_words(self) -> str:
        """Why this model cannot yet be applied to a scan ("" when it can): a part it needs
        is fitted at a site and this copy lacks it."""
        return ""

    @abstractmethod
    def preview(self, n: int) -> torch.Tensor:
        """Images in [-1, 1], shape (k, 1, H, W), for sample grids: ``n`` outputs, or
        ``n`` rows of ``preview_columns`` for image-to-image tasks. Never patient data."""

    @property
    def private_modules(self) -> dict[str, nn.Module]:
        return {name: self.groups[name] for name in self.private_groups}

    def get_weights(self) -> dict[str, np.ndarray]:
        return group_arrays(self.groups)

    def set_weights(self, arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
        load_group_arrays(self.groups, arrays, source)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.groups)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimisers' state after the last ``train`` as named arrays (empty: none kept)."""
        return {}

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Start the next ``train`` from this optimiser state (from ``optimizer_state``)."""
        if arrays:
            raise WeightsError(f"task {self.name} keeps no optimiser state, but state was given")


def set_hooks(module: nn.Module, enabled: bool) -> None:
    """Switch Opacus' per-sample gradient hooks (no-op on a plain module)."""
    if isinstance(module, GradSampleModule):
        module.enable_hooks() if enabled else module.disable_hooks()


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device_type``: backward passes, clipping and optimiser steps run in
    the weights' float32 whatever the forward pass ran in (``TrainingSetup.forward``)."""
    return torch.autocast(device_type, enabled=False)


def close_private(*modules: nn.Module) -> None:
    """Remove Opacus hooks so the plain modules can be wrapped again next round."""
    for module in modules:
        if isinstance(module, GradSampleModule):
            module._close()


@dataclass(frozen=True)
class BatchPart:
    """One physical part of a step's batch: its rows, its share of the batch's records, and
    whether the optimiser steps after it (``TrainingSetup.parts``)."""

    rows: slice
    share: float
    last: bool


@dataclass
class TrainingSetup:
    """What one local round of a GAN task trains with: the (possibly private) networks,
    their optimisers, the generator that draws batches (secret under DP), and the most
    records one pass may hold (``task.physical-batch``; 0: the whole batch)."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sampler: torch.Generator
    rng: torch.Generator
    physical_batch: int = 0
    #: Steps taken so far this round (0 during the first): tasks that step their networks at
    #: different rates read it (``task.d-steps``).
    steps_taken: int = 0
    #: Under DP, the Poisson batch's expected size (0: no DP). What a step does beyond its real
    #: records (how many images it generates) must not depend on how many it drew.
    expected_batch: int = 0
    #: ``task.precision``: the step's forward passes run under bfloat16 autocast on this
    #: device type ("": float32). Backward passes and optimiser steps leave it (``backward``,
    #: ``step``): weights, their gradients, Adam's state and DP-SGD's norms, clipping and
    #: noise stay float32 (``medgan_core.privacy.per_sample.full_precision_factors``).
    autocast_device: str = ""

    def forward(self) -> contextlib.AbstractContextManager:
        """Where a step's forward passes and losses run: under bfloat16 autocast when
        ``task.precision = "bf16"``, else as they are."""
        return torch.autocast(self.autocast_device, dtype=torch.bfloat16) if self.autocast_device \
            else contextlib.nullcontext()

    def parts(self, records: int, rows_per_record: int = 1) -> list[BatchPart]:
        """The physical parts a step on ``records`` records (each ``rows_per_record`` adjacent
        rows: its views) passes through a network in: at most ``physical_batch`` records
        each, a record never split (its views are averaged into one gradient)."""
        size = self.physical_batch if 0 < self.physical_batch < records else records
        starts = range(0, records, size)
        return [BatchPart(slice(start * rows_per_record, min(start + size, records) * rows_per_record),
                          (min(start + size, records) - start) / records, start + size >= records)
                for start in starts]

    def noise_only_step(self) -> None:
        """A step on a Poisson batch that drew no record: each private optimiser steps on its
        noise alone (``GhostDPOptimizer.noise_only_step``); nothing else learns."""
        for optimizer in (self.opt_d, self.opt_g):
            if isinstance(optimizer, GhostDPOptimizer):
                optimizer.zero_grad(set_to_none=True)
                optimizer.noise_only_step()

    @staticmethod
    def backward(loss: torch.Tensor, stepping: nn.Module, part: BatchPart | None = None) -> None:
        """The gradients the next step of ``stepping`` needs: under DP its per-sample ones
        only (``FastConvGradSampleModule.backward``), else ``loss.backward()``. ``loss`` is a
        mean over the rows of ``part``: without DP it counts by the part's share of the
        batch (the parts' gradients add up to the whole batch's); under DP each record's
        gradient is its own whatever the part, and the optimiser divides their clipped sum
        by the expected batch size."""
        with full_precision(loss.device.type):
            if isinstance(stepping, FastConvGradSampleModule):
                stepping.backward(loss)
            elif part is None or part.share == 1.0:
                loss.backward()
            else:
                (loss * part.share).backward()

    @staticmethod
    def step(optimizer: torch.optim.Optimizer, part: BatchPart | None = None) -> None:
        """The optimiser's step after ``part``'s backward. Before the last part a private
        optimiser clips and adds up the part's per-sample gradients and frees them (Opacus'
        skipped step, as its ``BatchMemoryManager`` does), with no noise and no update; a
        plain one keeps adding gradients. After the last: one step on the whole batch."""
        last = part is None or part.last
        with full_precision(optimizer.param_groups[0]["params"][0].device.type):
            if isinstance(optimizer, DPOptimizer):
                if not last:
                    optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                if not last:
                    optimizer.zero_grad(set_to_none=True)  # per-sample gradients go; their clipped sum stays
            elif last:
                optimizer.step()

    @contextlib.contextmanager
    def learning_through(self, module: nn.Module) -> Iterator[None]:
        """While the other network learns through ``module`` (G through D's judgement; D on
        G's output), ``module`` is not updated: its weights need no gradient (the backward
        skips computing them) and, under DP, its per-sample hooks are off (they would record
        activations it never steps on)."""
        thawed = [p for p in module.parameters() if p.requires_grad]
        set_hooks(module, enabled=False)
        for param in thawed:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param in thawed:
                param.requires_grad_(True)
            set_hooks(module, enabled=True)


#: What a round trains (``task.trainable``): every parameter, or (fine-tuning a trained model)
#: only the normalisation layers' scales and shifts and the biases (``all_but_norms_and_biases`` stay).
TRAINABLE = ("all", "norms")


@dataclass(frozen=True)
class GANParams(TaskParams):
    """Settings every GAN task has beside its own losses."""

    #: The generator a round ends with: an exponential moving average of its steps in the
    #: round with this decay (``GANTask.ema_decay``; 0: the last step).
    ema: float = 0.0
    #: ``norms``: only normalisation scales/shifts and biases train (``GANTask.frozen_parameters``).
    trainable: str = "all"
    #: Adam's first-moment decay (DCGAN's and pix2pix's 0.5). Under DP a larger one averages
    #: the noise of more steps into each update; the privacy cost is the same (post-processing).
    adam_beta1: float = 0.5

    def validate(self, task: TaskConfig) -> None:
        if not 0 <= self.ema < 1:
            raise ConfigError(f"task.ema = {self.ema}; it must lie in [0, 1) (0: off; 0.99 averages ~100 steps)")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"task.trainable = {self.trainable!r}; choose one of {', '.join(TRAINABLE)}")
        if not 0 <= self.adam_beta1 < 1:
            raise ConfigError(f"task.adam-beta1 = {self.adam_beta1}; it must lie in [0, 1) (0.5: DCGAN's)")


class GANTask(Task):
    """Shared plumbing of generator/discriminator tasks: Adam (β1 = ``task.adam-beta1``, by default
    0.5 as in DCGAN and pix2pix; β2 = 0.999), DP-SGD wrapping of ``private_groups``, Poisson or
    uniform batches."""

    generator: nn.Module
    discriminator: nn.Module
    #: Whether a step whose Poisson batch came out empty still steps (on what it generates,
    #: with the private optimiser's noise), as DP-SGD's analysis has it; otherwise it is
    #: skipped (a step of an image-to-image task has nothing to train on without records).
    steps_on_empty_batch: ClassVar[bool] = False

    def __init__(self, config: TaskConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        with seeded(config.seed):  # same seed, same initial model, at every site and the server
            generator, discriminator = self.build_networks()
        self.generator = generator.to(self.device)
        self.discriminator = discriminator.to(self.device)
        self._optimizer_states: dict[str, dict] = {}  # Adam state after the last train()

    @abstractmethod
    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        """(generator, discriminator), freshly initialised; called under the task's seed."""

    @property
    def groups(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    @property
    def ema_decay(self) -> float:
        """``task.ema``: the round ends on an exponential moving average of the generator's
        steps (from the round's start) instead of its last step. Under DP it is
        post-processing of the private iterates: no privacy cost. 0: the last step."""
        return self.params.ema if isinstance(self.params, GANParams) else 0.0

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Adam's moments and step counts as ``<group>.<param index>.<key>`` arrays."""
        arrays = {}
        for group, state in self._optimizer_states.items():
            for index, values in state["state"].items():
                for key, tensor in values.items():
                    arrays[f"{group}.{index}.{key}"] = torch.as_tensor(tensor).detach().cpu().numpy().copy()
        return arrays

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        states: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        params = {group: list(module.parameters()) for group, module in self.groups.items()}
        for name, array in arrays.items():
            group, index, key = name.split(".", 2)
            if group not in params or not index.isdigit() or int(index) >= len(params[group]):
                raise WeightsError(f"saved optimiser state {name} does not belong to this model")
            if key.startswith("exp_avg") and tuple(array.shape) != tuple(params[group][int(index)].shape):
                raise WeightsError(f"saved optimiser state {name} has shape {array.shape}; the model changed")
            tensor = torch.from_numpy(np.array(array))
            if key == "step":  # Adam keeps its step count as a 0-d tensor
                tensor = tensor.reshape(())
            states.setdefault(group, {}).setdefault(int(index), {})[key] = tensor
        self._optimizer_states = {group: {"state": state} for group, state in states.items()}

    def _optimizer(self, group: str, lr: float) -> torch.optim.Optimizer:
        """Adam for one group, restored from the last round's state and with the FedProx
        step attached when those are asked for."""
        module = self.groups[group]
        lr = lr * self.local_training.lr_scale
        beta1 = self.params.adam_beta1 if isinstance(self.params, GANParams) else 0.5
        optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=(beta1, 0.999))
        saved = self._optimizer_states.get(group)
        if saved is not None:
            optimizer.load_state_dict({"state": saved["state"], "param_groups": optimizer.state_dict()["param_groups"]})
        mu = self.local_training.proximal_mu
        if mu > 0:
            exclude, anchor = self.local_training.proximal_exclude, self.local_training.anchor
            anchors = [(p, p.detach().clone() if anchor is None else
                        torch.as_tensor(np.asarray(anchor[f"{group}.{n}"]), dtype=p.dtype, device=p.device))
                       for n, p in module.named_parameters() if f"{group}.{n}" not in exclude]
            fraction = min(1.0, lr * mu)

            def proximal_step(*_: object) -> None:
                with torch.no_grad():
                    for param, anchor in anchors:
                        param.lerp_(anchor, fraction)

            optimizer.register_step_post_hook(proximal_step)  # fires after DPOptimizer's step too
        return optimizer

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters that keep their values this round: they get no gradient, no per-sample
        gradient under DP, and no noise. With ``task.trainable = "norms"`` every weight of
        both networks but the normalisation layers' and the biases (fine-tuning a trained
        model with DP: the noise a step adds grows with the coordinates it trains, the
        clipped signal does not; DP-BiTFiT, Bu et al. 2022). Otherwise none."""
        if not isinstance(self.params, GANParams) or self.params.trainable == "all":
            return []
        return [p for module in self.groups.values() for p in all_but_norms_and_biases(module)]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """``frozen_parameters`` without gradients for the duration, trainable again after."""
        frozen = [p for p in self.frozen_parameters() if p.requires_grad]
        for param in frozen:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param in frozen:
                param.requires_grad_(True)

    @contextlib.contextmanager
    def training_setup(self, dp: DPSettings | None, seed: int) -> Iterator[TrainingSetup]:
        with self.frozen():  # before Opacus wraps the networks: it hooks trainable layers only
            yield from self._training_setup(dp, seed)

    def _training_setup(self, dp: DPSettings | None, seed: int) -> Iterator[TrainingSetup]:
        """``training_setup``'s body, with the frozen parameters already frozen."""
        cfg = self.config
        rng = torch.Generator().manual_seed(seed)
        opt_g = self._optimizer("generator", cfg.lr_generator)
        opt_d = self._optimizer("discriminator", cfg.lr_discriminator)
        setup = TrainingSetup(self.generator, self.discriminator, opt_g, opt_d, rng, rng, cfg.physical_batch,
                              autocast_device=self.device.type if cfg.precision == "bf16" else "")
        if dp is not None:
            setup.expected_batch = dp.expected_batch_size
            setup.sampler = privacy_generator(dp, seed + 1)  # secret: which records are in a batch
            noise = privacy_generator(dp, seed + 2, self.device)  # secret: the noise, drawn where the weights are
            for group in self.private_groups:
                optimizer = setup.opt_g if group == "generator" else setup.opt_d
                module, private = make_private(self.groups[group], optimizer, dp, generator=noise)
                if group == "generator":
                    setup.generator, setup.opt_g = module, private
                else:
                    setup.discriminator, setup.opt_d = module, private
        try:
            with warnings.catch_warnings():
                # Opacus' hooks on a first layer fire for inputs without grad: harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                setup.generator.train()
                setup.discriminator.train()
                yield setup
            self._optimizer_states = {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()}
        finally:
            close_private(setup.generator, setup.discriminator)

    def batch_pools(self, data: SiteData) -> dict[str, int]:
        """The record pools a step draws one batch from each, by size; a record is in one
        pool only (default: the training split)."""
        return {"train": data.num_train}

    @abstractmethod
    def train_step(self, s: TrainingSetup, data: SiteData, pool: str, idx: torch.Tensor) -> dict[str, float]:
        """One update of the networks on a batch (indices ``idx`` of ``pool``); the losses.

        Under DP the private networks in ``s`` are Opacus-wrapped: a network another one
        learns through must have its per-sample hooks off then (``s.learning_through``)."""

    def train(
        self,
        data: SiteData,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: SiteAccountant | None = None,
    ) -> dict[str, float]:
        """The one GAN loop: every step draws a batch of each pool (Poisson and accounted
        once under DP) and the task steps on each non-empty one; the mean losses."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        pools = self.batch_pools(data)
        patients = self.patient_pools(data) if dp is not None and dp.unit == "patient" else None
        decay = self.ema_decay
        average = [p.detach().clone() for p in self.generator.parameters()] if decay else None
        with self.training_setup(dp, seed) as s:
            for _ in range(steps):
                for pool, idx in self.draw_batches(pools, s, dp, accountant, patients).items():
                    if idx.numel() == 0 and not self.steps_on_empty_batch:
                        s.noise_only_step()  # an empty Poisson batch: the private networks take the noise
                        continue
                    with s.forward():
                        losses = self.train_step(s, data, pool, idx)
                    for key, value in losses.items():
                        totals[key] = totals.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
                s.steps_taken += 1
                if average is not None:
                    with torch.no_grad():
                        for mean, param in zip(average, self.generator.parameters()):
                            mean.lerp_(param.detach(), 1 - decay)
        if average is not None:
            with torch.no_grad():
                for param, mean in zip(self.generator.parameters(), average):
                    param.copy_(mean)
        return {key: totals[key] / counts[key] for key in totals}

    def draw_batches(
        self, pools: Mapping[str, int], s: TrainingSetup, dp: DPSettings | None, accountant: SiteAccountant | None,
        patients: Mapping[str, PatientRows] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Indices of this step's batch of each pool. Under DP, Poisson batches from the secret
        sampler (of patients, one slice each, when ``patients`` are given), and the step
        accounted once: each record is in one pool, so the step is one release of the joint
        mechanism whatever the number of pools."""
        if dp is None:
            return {pool: torch.randint(0, n, (min(self.config.batch_size, n),), generator=s.rng)
                    for pool, n in pools.items()}
        self.account_step(dp, accountant)
        if patients is not None:
            return {pool: patients[pool].draw(dp.sample_rate, s.sampler) for pool in pools}
        return {pool: poisson_batch(n, dp.sample_rate, s.sampler) for pool, n in pools.items()}

    def pool_subjects(self, data: SiteData) -> dict[str, torch.Tensor | None]:
        """Each pool's rows' patients (``batch_pools``' pools; None where the data has none)."""
        return {"train": data.train_subjects}

    def patient_pools(self, data: SiteData) -> dict[str, PatientRows]:
        """Each pool's rows by patient, for DP with the patient as the record."""
        pools = {}
        for pool, subjects in self.pool_subjects(data).items():
            if subjects is None:
                raise PrivacyError(f"site {data.site}: privacy.unit = 'patient' needs each training slice's patient, "
                                   "and this data has none (a site's manifest names every series' subject)")
            pools[pool] = PatientRows.of(subjects)
        return pools

    def dp_records(self, data: SiteData, unit: str) -> int:
        """How many records DP-SGD samples from at this site (its sample rate is the batch over
        this): the first pool's slices, or its patients."""
        if unit == "patient":
            return next(iter(self.patient_pools(data).values())).patients
        return next(iter(self.batch_pools(data).values()))

    def account_step(self, dp: DPSettings, accountant: SiteAccountant | None) -> None:
        """One step on one Poisson batch is one release of the joint mechanism of the private
        networks that step on it (``joint_noise_multiplier``), however many there are."""
        if accountant is not None:
            accountant.step(joint_noise_multiplier(dp.noise_multiplier, self.dp_releases_per_step), dp.sample_rate)
