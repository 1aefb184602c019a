"""The configuration tables, each a dataclass validated on load with messages naming the key.

``[run]``, ``[task]`` (the keys every task shares; a task's own keys are its ``TaskParams``),
``[privacy]`` and ``[aggregation]`` make a study (``medgan_core.study_config``); a hospital's
``site.toml`` and the coordinator's ``coordinator.toml`` are read here too. Nothing here
knows any particular task, so every module may import it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from medgan_core.errors import ConfigError
from medgan_core.site_label import is_site_name
from medgan_core.policies.registry import LOCAL, policy_class, policy_names

MODALITIES = ("CT", "MR")
DEVICES = ("auto", "cpu", "cuda")
ACCOUNTANTS = ("rdp", "prv")
#: What one record of DP-SGD is, the unit ε protects (``privacy.unit``).
PRIVACY_UNITS = ("patient", "slice")
LR_SCHEDULES = ("constant", "cosine")  # learning rate over a study's rounds (medgan_core.tasks.base.lr_scale)
#: The number format of a training step's forward passes (``task.precision``): float32, or
#: bfloat16 autocast (``medgan_core.tasks.base.TrainingSetup.forward``).
PRECISIONS = ("fp32", "bf16")
#: A δ this large lets a mechanism publish a whole record with that probability: refused.
MAX_DELTA = 0.1
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi")
#: The widest networks a study may ask for: their size grows with the square of ``task.width``
#: and every site allocates them (the widest study here uses 32).
MAX_WIDTH = 256
MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 20.0  # task.spacing: finer than any clinical scan .. coarser than any


def config_key(name: str) -> str:
    """Python field name -> config key (``local_steps`` -> ``local-steps``)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class TaskParams:
    """A task's own settings, beside the shared ``TaskConfig`` (none by default).

    Each task subclasses it in its own file (``SuperResParams`` has ``scale``) and checks
    them in ``validate``; in a study file they sit in ``[task]`` next to the shared keys.
    """

    def validate(self, task: "TaskConfig") -> None:
        """Refuse values this task cannot train with (ConfigError naming the key)."""

    @property
    def step_views(self) -> int:
        """Views of each sampled record a training step computes on (work per step, for a
        site's step cap); 1 unless the task says otherwise."""
        return 1

    def dp_refusal(self, unit: str = "slice") -> str:
        """Why these settings cannot train under DP with records of ``unit`` ('' when they can):
        checked by the study and again at the site, whatever a coordinator lets through."""
        return ""


@dataclass(frozen=True)
class TaskConfig:
    """What every site trains, identical across sites (sent with each round).

    Only what every task shares; ``params`` holds the task's own settings, typed by the
    task (``medgan_core.tasks.registry.task_config`` builds both from config keys).

    ``spacing`` is the in-plane pixel size in mm the task works at (0: each series' own,
    or, for the whole-slice tasks, the slice resized to ``image-size`` whatever its
    pixels). ``image-size`` is the side of what a network sees at once: the training patch
    (and inference tile) of a task at clinical geometry (denoise, superres), the whole
    image of the others; with ``spacing`` > 0 a whole-slice task's image covers
    ``image-size × spacing`` mm, centred on the slice.
    """

    name: str = "synthesis"
    modality: str = "CT"
    image_size: int = 64
    spacing: float = 0.0
    batch_size: int = 32
    #: Records one forward/backward pass holds at most (0: the whole batch). A larger batch is
    #: stepped on in parts of this many, one optimiser step (under DP one clipped, noised
    #: release) per batch: memory follows this, the update follows ``batch_size``.
    physical_batch: int = 0
    local_steps: int = 50
    lr_generator: float = 2e-4
    lr_discriminator: float = 2e-4
    width: int = 32
    window_low: float = -160.0
    window_high: float = 240.0
    lr_schedule: str = "constant"  # both learning rates over the study's rounds: constant, or cosine down to 1/10
    #: Training forward passes in float32 or under bfloat16 autocast (weights, gradients,
    #: optimiser state, DP norms, clipping and noise stay float32; evaluation is float32).
    precision: str = "fp32"
    seed: int = 0
    params: TaskParams = field(default_factory=TaskParams)

    def to_items(self) -> dict[str, Any]:
        """Config keys and values, shared and the task's own together (``[task]`` of a study)."""
        shared = {config_key(f.name): getattr(self, f.name) for f in fields(self) if f.name != "params"}
        return {**shared, **{config_key(f.name): getattr(self.params, f.name) for f in fields(self.params)}}

    def validate(self) -> None:
        """The shared keys; the registry also checks the name and the task's own keys."""
        if self.modality not in MODALITIES:
            raise ConfigError(f"task.modality = {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        size = self.image_size
        if size < 16 or size > 256 or size & (size - 1):
            raise ConfigError(f"task.image-size = {size}; it must be a power of two from 16 to 256")
        if not (self.spacing == 0 or MIN_SPACING_MM <= self.spacing <= MAX_SPACING_MM):
            raise ConfigError(f"task.spacing = {self.spacing}; give a pixel size in mm from {MIN_SPACING_MM:g} to "
                              f"{MAX_SPACING_MM:g}, or 0 for each series' own")
        require_positive("task.batch-size", self.batch_size)
        require_positive("task.local-steps", self.local_steps)
        if self.physical_batch < 0:
            raise ConfigError(f"task.physical-batch = {self.physical_batch}; give the most records one pass may hold "
                              "(a whole number), or 0 for the whole batch")
        require_positive("task.width", self.width)
        if self.width % 8:
            raise ConfigError(f"task.width = {self.width}; it must be a multiple of 8 (GroupNorm groups)")
        if self.width > MAX_WIDTH:
            raise ConfigError(f"task.width = {self.width}; at most {MAX_WIDTH} (the networks grow with its square, "
                              "and every site allocates them)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"task.lr-schedule = {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"task.precision = {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for key, lr in (("task.lr-generator", self.lr_generator), ("task.lr-discriminator", self.lr_discriminator)):
            if not 0 < lr < 1:
                raise ConfigError(f"{key} = {lr}; a learning rate must lie in (0, 1)")
        if self.window_high <= self.window_low:
            raise ConfigError(
                f"task.window-high ({self.window_high}) must be above task.window-low ({self.window_low})"
            )
        self.params.validate(self)


TRACKERS = ("none", "tensorboard")  # run.tracking (server.tracking)


@dataclass(frozen=True)
class RunConfig:
    """How the federation runs: rounds, sites, outputs, device."""

    rounds: int = 5
    num_sites: int = 3
    sites_dir: str = "sites_example/data"
    out_dir: str = "runs/demo"
    device: str = "auto"
    fraction_train: float = 1.0
    min_answer_fraction: float = 0.5  # a round counts only if this share of sampled sites answered usefully
    round_timeout: float = 3600.0
    resume: bool = False  # continue the run in out-dir from its last complete round
    evaluate_every: int = 1  # held-out evaluation and sample grid: rounds 0, 1, every N-th and the last; 0: never
    tracking: str = "none"  # or "tensorboard": round metrics and sample grids under RUN_DIR/tensorboard
    initial_model: str = ""  # a .medgan model file whose weights start round 0 (a warm start; public data only)

    def evaluates(self, server_round: int) -> bool:
        """Whether the sites evaluate (and the coordinator draws a sample grid) after this round
        (``evaluate-every = 0``: never, for a run scored afterwards, as ``medgan study compare`` does)."""
        if self.evaluate_every == 0:
            return False
        return server_round in (0, 1, self.rounds) or server_round % self.evaluate_every == 0

    def validate(self) -> None:
        require_positive("run.rounds", self.rounds)
        if self.evaluate_every < 0:
            raise ConfigError(f"run.evaluate-every = {self.evaluate_every}; give a round count, or 0 for no "
                              "held-out evaluation during the run")
        require_positive("run.round-timeout", self.round_timeout)
        require_positive("run.num-sites", self.num_sites)
        for key, value in (("run.out-dir", self.out_dir), ("run.sites-dir", self.sites_dir)):
            if not value.strip():
                raise ConfigError(f"{key} is empty; name a folder")
        if Path(self.out_dir).expanduser().resolve() in (Path.cwd(), *Path.cwd().parents):
            raise ConfigError(f"run.out-dir = {self.out_dir!r} is the current folder or holds it; "
                              "name a run folder of its own, e.g. runs/demo")
        if self.device not in DEVICES:
            raise ConfigError(f"run.device = {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"run.fraction-train = {self.fraction_train}; it must lie in (0, 1]")
        if not 0 < self.min_answer_fraction <= 1:
            raise ConfigError(f"run.min-answer-fraction = {self.min_answer_fraction}; it must lie in (0, 1]")
        if self.tracking not in TRACKERS:
            raise ConfigError(f"run.tracking = {self.tracking!r}; choose one of {', '.join(TRACKERS)}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: DP-SGD at every site (default on) and optional central DP.

    Sites train every module that reads real images with DP-SGD (Opacus): per-sample
    clipping to ``max-grad-norm``, Poisson sampling, Gaussian noise. The noise multiplier
    is ``noise-multiplier`` when positive, else derived per site so that the planned
    rounds spend exactly ``target-epsilon`` at ``delta``. A site never trains past its
    budget (``target-epsilon`` unless the site sets its own ``epsilon-budget``).
    ``central-noise-multiplier`` > 0 adds server-side clipping and Gaussian noise to the
    aggregate (DP-FedAvg, site-level); ``secagg`` hides individual updates from the server.
    DP noise and Poisson sampling draw from OS entropy (``secure-rng``): seeded noise
    could be regenerated and subtracted by anyone who knows the seed, the server included.
    """

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    accountant: str = "rdp"
    central_noise_multiplier: float = 0.0
    central_clipping_norm: float = 10.0
    secagg: bool = False
    secure_rng: bool = True  # False only for tests: DP noise and sampling then follow the seed
    #: The record ε protects: a ``slice`` (a batch samples slices: a patient with k slices in
    #: training is covered only as a group of k), or a ``patient`` (a batch samples patients,
    #: one slice each).
    unit: str = "slice"

    def validate(self) -> None:
        if self.target_epsilon <= 0:
            raise ConfigError(f"privacy.target-epsilon = {self.target_epsilon}; it must be positive")
        if not 0 < self.delta < MAX_DELTA:
            raise ConfigError(f"privacy.delta = {self.delta}; it must lie in (0, {MAX_DELTA:g}) and should be below "
                              "1/N for N training records (a larger δ is no real protection)")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"privacy.max-grad-norm = {self.max_grad_norm}; it must be positive")
        if self.noise_multiplier < 0 or self.central_noise_multiplier < 0:
            raise ConfigError("privacy.noise-multiplier and privacy.central-noise-multiplier must be >= 0")
        if self.central_clipping_norm <= 0:
            raise ConfigError(f"privacy.central-clipping-norm = {self.central_clipping_norm}; it must be positive")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant = {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if self.unit not in PRIVACY_UNITS:
            raise ConfigError(f"privacy.unit = {self.unit!r}; choose one of {', '.join(PRIVACY_UNITS)}")


@dataclass(frozen=True)
class AggregationConfig:
    """How each parameter group is combined across sites, and how sites train between rounds.

    ``policy`` applies to every group unless ``group-policies`` names it
    (``"discriminator=local, generator=median"``): ``average`` (sample-weighted FedAvg),
    ``local`` (never leaves the site; kept in its state folder between rounds),
    ``trimmed-mean`` (coordinate-wise, dropping ``trim-fraction`` of sites at each end) or
    ``median`` (coordinate-wise). ``local-norm`` keeps every normalisation layer local
    (FedBN); ``local-calibration`` keeps every site-calibration layer local (a generator's
    output gain and offset: each hospital's own scanner calibration). ``server-optimizer``
    applies FedAdam/FedYogi (Flower's) to the averaged update; ``server-momentum`` β > 0 with
    plain averaging is FedAvgM (Hsu et al. 2019, Flower's): the server steps along a running
    sum of the rounds' averaged updates, so a round moves the model up to 1/(1 − β) times as
    far as the average alone (nearer to what sequential steps over the pooled data do);
    ``proximal-mu`` > 0 pulls each site's weights back towards the global model (FedProx);
    ``ditto-steps`` > 0 (Ditto, Li et al. 2021): every round each site also trains its own
    personal model, that many steps from where its last round left it, each step pulled a
    fraction lr × ``ditto-lambda`` towards the global model the round received; the site
    evaluates and exports that model and never sends it (0 < λ: the larger, the nearer the
    global model; the personal model costs the site those steps of work and, under DP, of ε);
    ``keep-optimizer-state`` carries each site's Adam moments from round to round;
    ``finetune-steps`` > 0: after its last round's federated steps each site trains that many
    more on its own data and keeps the result, its personal model, which it evaluates and
    exports but never sends. ``finetune-validate-every`` > 0: without DP, the site scores its
    model on its own validation subjects every that many fine-tune steps (and before the
    first) and keeps the best, not the last (early stopping; tasks with a held-out score,
    at sites with a ``val`` split). Under DP the fine-tune keeps its last model: a choice
    made by looking at images outside the accountant would not be covered by ε.
    """

    policy: str = "average"
    group_policies: str = ""
    local_norm: bool = False
    local_calibration: bool = False
    trim_fraction: float = 0.2
    server_optimizer: str = "fedavg"
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_momentum: float = 0.0
    proximal_mu: float = 0.0
    ditto_steps: int = 0
    ditto_lambda: float = 50.0  # lr × λ = 1 % a step at the default lr 2e-4
    keep_optimizer_state: bool = False
    finetune_steps: int = 0
    finetune_validate_every: int = 100

    def overrides(self) -> dict[str, str]:
        """``group-policies`` parsed: ``{"discriminator": "local", …}``."""
        out: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.group_policies.split(","))):
            group, sep, policy = (s.strip() for s in item.partition("="))
            if not sep or not group or not policy:
                raise ConfigError(
                    f"aggregation.group-policies item {item!r}; write GROUP=POLICY, e.g. 'discriminator=local'"
                )
            if group in out:
                raise ConfigError(f"aggregation.group-policies names group {group!r} twice")
            out[group] = policy
        return out

    def combined_policies(self) -> list[str]:
        """The policies named that the coordinator computes (all but ``local``)."""
        return sorted({p for p in (self.policy, *self.overrides().values()) if p != LOCAL})

    def nonlinear_policies(self) -> list[str]:
        """Named policies that are not a mean of the updates (no secure aggregation, no central DP)."""
        return [p for p in self.combined_policies() if not policy_class(p).linear]

    def policy_of(self, group: str) -> str:
        return self.overrides().get(group, self.policy)

    def policies(self, groups: Sequence[str]) -> dict[str, str]:
        """The policy of each of a task's groups; a group name the task lacks is an error."""
        unknown = sorted(set(self.overrides()) - set(groups))
        if unknown:
            raise ConfigError(
                f"aggregation.group-policies names {', '.join(map(repr, unknown))}; this task's groups are "
                f"{', '.join(groups)}"
            )
        return {group: self.policy_of(group) for group in groups}

    @property
    def has_server_state(self) -> bool:
        """Whether the coordinator carries optimiser state (moments, momentum) from round to round."""
        return self.server_optimizer != "fedavg" or self.server_momentum > 0

    @property
    def has_site_state(self) -> bool:
        """Whether sites must keep weights or optimiser state between rounds."""
        overrides = self.overrides()
        return (self.local_norm or self.local_calibration or self.keep_optimizer_state or self.finetune_steps > 0
                or self.ditto_steps > 0 or LOCAL in (self.policy, *overrides.values()))

    def validate(self) -> None:
        for key, value in (("aggregation.policy", self.policy), *(
            (f"aggregation.group-policies ({group})", policy) for group, policy in self.overrides().items()
        )):
            if value not in policy_names():
                raise ConfigError(f"{key} = {value!r}; choose one of {', '.join(policy_names())}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"aggregation.trim-fraction = {self.trim_fraction}; it must lie in [0, 0.5)")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError(
                f"aggregation.server-optimizer = {self.server_optimizer!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}"
            )
        if self.server_lr <= 0 or self.server_tau <= 0:
            raise ConfigError("aggregation.server-lr and aggregation.server-tau must be positive")
        for key, beta in (("aggregation.server-beta1", self.server_beta1), ("aggregation.server-beta2", self.server_beta2)):
            if not 0 <= beta < 1:
                raise ConfigError(f"{key} = {beta}; it must lie in [0, 1)")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"aggregation.server-momentum = {self.server_momentum}; it must lie in [0, 1) "
                              "(0 = plain FedAvg)")
        if self.server_momentum > 0 and self.server_optimizer != "fedavg":
            raise ConfigError(f"aggregation.server-momentum applies to server-optimizer = 'fedavg' (FedAvgM); "
                              f"{self.server_optimizer} has its own first moment (server-beta1)")
        if self.proximal_mu < 0:
            raise ConfigError(f"aggregation.proximal-mu = {self.proximal_mu}; it must be >= 0 (0 = no FedProx term)")
        if not 0 <= self.ditto_steps <= 100_000:
            raise ConfigError(f"aggregation.ditto-steps = {self.ditto_steps}; it must lie in 0..100000 "
                              "(0 = no Ditto personal model)")
        if not self.ditto_lambda > 0:
            raise ConfigError(f"aggregation.ditto-lambda = {self.ditto_lambda}; it must be > 0 (the pull of each "
                              "site's personal model towards the global one)")
        if self.ditto_steps > 0 and self.finetune_steps > 0:
            raise ConfigError("aggregation.ditto-steps and aggregation.finetune-steps both make a personal model; "
                              "set one of them to 0")
        if not 0 <= self.finetune_steps <= 100_000:
            raise ConfigError(f"aggregation.finetune-steps = {self.finetune_steps}; it must lie in 0..100000 "
                              "(0 = no personal fine-tune)")
        if not 0 <= self.finetune_validate_every <= 100_000:
            raise ConfigError(f"aggregation.finetune-validate-every = {self.finetune_validate_every}; it must lie in "
                              "0..100000 (0 = keep the fine-tune's last model)")


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings; they never leave the site, but for its ``name``: every
    reply carries it (``announced_name``) so the coordinator's logs and reports say which
    hospital answered, failed or went silent instead of a node number.

    In deployment they come from the SuperNode's node config (``data-path``,
    ``state-dir``, ``device``, ``epsilon-budget``, ``physical-batch``, ``precision``, ``site-name``); in
    simulation from the study's site folders.
    """

    data_path: str
    name: str = ""
    state_dir: str = ""
    device: str = "auto"
    epsilon_budget: float = 0.0  # 0: the study's privacy.target-epsilon
    # The most records one pass holds at this site (0: the study's task.physical-batch): what
    # fits this hospital's memory. The update is the whole batch's either way.
    physical_batch: int = 0
    # The number format of this machine's training forward passes ("": the study's
    # task.precision): bf16 where the hardware has it, fp32 where it would be emulated.
    precision: str = ""
    # The site's privacy policy: what the coordinator's study may not lower. The Python
    # defaults let the study decide (simulation: one researcher owns every site); a
    # deployed site's site.toml and node config default to the strict HOSPITAL_POLICY.
    require_dp: bool = False
    require_secure_rng: bool = False
    max_delta: float = MAX_DELTA
    require_patient_level: bool = False  # ε must protect a patient (privacy.unit = "patient"), not a slice
    release_test_metrics: bool = True  # held-out scores (of the test split, outside ε) may leave
    # The most training steps one round may ask of this site, local steps and a personal
    # fine-tune together (0: no cap): a buggy or hostile study cannot hold the machine for days.
    max_steps_per_round: int = 0
    # The largest batch a study may ask of this site (0: no cap): a step's time and, unless the
    # site bounds its passes (physical-batch), its memory grow with it.
    max_batch_size: int = 0
    app_hash: str = ""  # deployed: study-app SHA-256s this site runs, comma-separated ("": the app installed here)

    @property
    def site_name(self) -> str:
        """How the site's own log names it: its name, else its data folder's."""
        return self.name or Path(self.data_path).name

    @property
    def announced_name(self) -> str:
        """The name every reply carries: the one set (site.toml ``name``, node config
        ``site-name``; a simulated site's folder name), never the data folder of a deployed
        site ('' when none is set: the coordinator then names the site by its node number)."""
        return self.name if is_site_name(self.name) else ""

    def budget(self, privacy: "PrivacyConfig") -> float:
        """The ε this site spends at most: its own budget when set, else the study's target."""
        return self.epsilon_budget if self.epsilon_budget > 0 else privacy.target_epsilon

    def refusal(self, privacy: "PrivacyConfig") -> str:
        """Why this site refuses a study's privacy settings ('' when it accepts them)."""
        if self.require_dp and not privacy.enabled:
            return (f"site {self.site_name} requires differential privacy, but the study has [privacy] enabled = "
                    "false; refused by the site's policy")
        if not privacy.enabled:
            return ""
        if self.require_secure_rng and not privacy.secure_rng:
            return (f"site {self.site_name} requires secret (OS-entropy) DP noise, but the study asks for "
                    "secure-rng = false; refused by the site's policy")
        if privacy.delta > self.max_delta:
            return (f"site {self.site_name} allows δ up to {self.max_delta:g}, the study asks for "
                    f"δ = {privacy.delta:g}; refused by the site's policy")
        if self.require_patient_level and privacy.unit != "patient":
            return (f"site {self.site_name} requires ε per patient ([privacy] unit = \"patient\"), the study asks for "
                    f"unit = {privacy.unit!r} (a patient with k slices would be covered only as a group of k); "
                    "refused by the site's policy")
        return ""

    def work_refusal(self, task: TaskConfig, finetune_steps: int, ditto_steps: int = 0) -> str:
        """Why this site refuses a round of ``task``'s local steps plus a ``finetune_steps``
        personal fine-tune and ``ditto_steps`` of a Ditto personal model ('' when its policy
        allows them). A step of several views of each record (``views-per-record``) is that
        many steps of work."""
        if 0 < self.max_batch_size < task.batch_size:
            return (f"site {self.site_name} takes batches of at most {self.max_batch_size} records "
                    f"(max-batch-size), the study asks for task.batch-size = {task.batch_size}; refused by the "
                    "site's policy")
        views = task.params.step_views
        asked = (task.local_steps + finetune_steps + ditto_steps) * views
        if self.max_steps_per_round <= 0 or asked <= self.max_steps_per_round:
            return ""
        what = (f"{task.local_steps} local steps" + (f" + {finetune_steps} fine-tune steps" if finetune_steps else "")
                + (f" + {ditto_steps} steps of its Ditto personal model" if ditto_steps else ""))
        if views > 1:
            what += f", each of {views} views of every record ({asked} steps of work)"
        return (f"site {self.site_name} runs at most {self.max_steps_per_round} training steps a round "
                f"(max-steps-per-round), the study asks for {what}; refused by the site's policy")

    def validate(self) -> "SiteConfig":
        if not self.data_path:
            raise ConfigError("site data-path is empty; name the folder that holds the site's manifest.csv")
        if self.name and not is_site_name(self.name):
            raise ConfigError(f"site name = {self.name!r}; it travels with every reply to the coordinator, so it must "
                              "be a short label (1-64 letters, digits, spaces, '.', '-', \"'\" or '_', starting "
                              "with a letter or digit), not a path")
        if self.device not in DEVICES:
            raise ConfigError(f"site device = {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not math.isfinite(self.epsilon_budget) or self.epsilon_budget < 0:
            raise ConfigError(f"site epsilon-budget = {self.epsilon_budget}; it must be >= 0 (0 = the study's target)")
        if self.physical_batch < 0:
            raise ConfigError(f"site physical-batch = {self.physical_batch}; it must be >= 0 "
                              "(0 = the study's task.physical-batch)")
        if self.precision not in ("", *PRECISIONS):
            raise ConfigError(f"site precision = {self.precision!r}; choose one of {', '.join(PRECISIONS)} "
                              "(or leave it out for the study's task.precision)")
        if not 0 < self.max_delta <= MAX_DELTA:
            raise ConfigError(f"site max-delta = {self.max_delta}; it must lie in (0, {MAX_DELTA:g}]")
        if self.max_steps_per_round < 0:
            raise ConfigError(f"site max-steps-per-round = {self.max_steps_per_round}; it must be >= 0 (0 = no cap)")
        if self.max_batch_size < 0:
            raise ConfigError(f"site max-batch-size = {self.max_batch_size}; it must be >= 0 (0 = no cap)")
        return self


#: What a hospital's site.toml (and a deployed SuperNode's node config) defaults to: DP
#: required, secret noise required, δ at most 1e-5, ε per patient (not per slice), held-out
#: scores kept at the site, at most 10 000 training steps a round (the benchmarks' longest
#: round with a fine-tune is under 1 000).
HOSPITAL_POLICY = {"require-dp": True, "require-secure-rng": True, "max-delta": 1e-5, "require-patient-level": True,
                   "release-test-metrics": False, "max-steps-per-round": 10_000, "max-batch-size": 512}


@dataclass(frozen=True)
class ConnectionConfig:
    """How a site reaches the coordinator: address, the study CA, its own key, local port."""

    superlink: str = "127.0.0.1:8000"
    ca_cert: str = "certs/ca.crt"
    private_key: str = ""
    port: int = 9094  # the SuperNode's local runtime port (distinct per node on one host)

    def validate(self) -> "ConnectionConfig":
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"connection.superlink = {self.superlink!r}; use HOST:PORT, e.g. coordinator.example.org:8000")
        if not self.private_key:
            raise ConfigError("connection.private-key is empty; create one with 'medgan site keys'")
        if not 1024 <= self.port <= 65535:
            raise ConfigError(f"connection.port = {self.port}; choose a free port from 1024 to 65535")
        return self


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator's SuperLink: where it listens, its TLS files, its state database."""

    host: str = "127.0.0.1"
    port: int = 8000
    certs_dir: str = "certs"  # ca.crt, server.pem, server.key from `medgan certs init`
    database: str = "coordinator/state.db"
    control_from: str = "127.0.0.1,::1"  # addresses that may use the Control API (register, run): this host

    @property
    def control_addresses(self) -> list[str]:
        return [a.strip() for a in self.control_from.split(",") if a.strip()]

    @property
    def local_address(self) -> str:
        """Where the coordinator's own commands reach the SuperLink: loopback when it listens there."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "localhost", "127.0.0.1") else self.host
        return f"{host}:{self.port}"

    def validate(self) -> "CoordinatorConfig":
        if not 1024 <= self.port <= 65535:
            raise ConfigError(f"coordinator.port = {self.port}; choose a free port from 1024 to 65535")
        import ipaddress

        for address in self.control_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"coordinator.control-from: {address!r} is not an IP address") from None
        if not self.control_addresses:
            raise ConfigError("coordinator.control-from is empty; the coordinator could not register sites")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_tables(path: str | Path, allowed: tuple[str, ...]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; allowed: {', '.join(f'[{t}]' for t in allowed)}")
    return raw


def _resolve(base: Path, value: str) -> str:
    """Paths in a config file are relative to the file's folder."""
    return str(value and (base / value).resolve() if not Path(value).is_absolute() else value)


def load_site(path: str | Path) -> tuple[SiteConfig, ConnectionConfig]:
    """A hospital's site.toml: ``[site]`` (data, state, budget) and ``[connection]``."""
    path = Path(path)
    raw = load_tables(path, ("site", "connection"))
    site_items = dict(raw.get("site", {}))
    if "data-path" not in site_items:
        raise ConfigError(f"{path}: [site] needs data-path, the folder that holds the site's manifest.csv")
    site = build_table(SiteConfig, {"data-path": "", **HOSPITAL_POLICY, **site_items}, "site", str(path))
    connection = build_table(ConnectionConfig, raw.get("connection", {}), "connection", str(path))
    base = path.parent
    site = dataclasses.replace(site, data_path=_resolve(base, site.data_path), state_dir=_resolve(base, site.state_dir))
    connection = dataclasses.replace(connection, ca_cert=_resolve(base, connection.ca_cert),
                                     private_key=_resolve(base, connection.private_key))
    return site.validate(), connection.validate()


def load_coordinator(path: str | Path) -> CoordinatorConfig:
    """The coordinator's coordinator.toml: one ``[coordinator]`` table."""
    path = Path(path)
    raw = load_tables(path, ("coordinator",))
    config = build_table(CoordinatorConfig, raw.get("coordinator", {}), "coordinator", str(path))
    base = path.parent
    return dataclasses.replace(config, certs_dir=_resolve(base, config.certs_dir),
                               database=_resolve(base, config.database)).validate()


def table_items(flat: Mapping[str, Any], table: str) -> dict[str, Any]:
    """The ``TABLE.key`` items of a flat (Flower) config, without the table prefix."""
    return {k[len(table) + 1:]: v for k, v in flat.items() if k.startswith(f"{table}.")}


def privacy_config_from_flat(flat: Mapping[str, Any]) -> PrivacyConfig:
    """Rebuild the privacy settings a client receives in a round's ConfigRecord."""
    config = build_table(PrivacyConfig, table_items(flat, "privacy"), "privacy", "round config")
    config.validate()
    return config


def aggregation_config_from_flat(flat: Mapping[str, Any]) -> AggregationConfig:
    """Rebuild the aggregation settings a client receives in a round's ConfigRecord."""
    config = build_table(AggregationConfig, table_items(flat, "aggregation"), "aggregation", "round config")
    config.validate()
    return config


def require_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} = {value}; it must be a positive number")


def build_table(cls: type, values: Mapping[str, Any], table: str, source: str) -> Any:
    """Make a dataclass from config keys, naming any unknown key or wrong type."""
    by_key = {config_key(f.name): f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        f = by_key.get(key)
        if f is None:
            raise ConfigError(
                f"{source}: unknown key {table}.{key}; allowed keys: {', '.join(sorted(by_key))}"
            )
        expected = type(f.default) if f.default is not dataclasses.MISSING else str
        kwargs[f.name] = _coerce(f"{table}.{key}", value, expected, source)
    return cls(**kwargs)


def _coerce(key: str, value: Any, expected: type, source: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {key} = {value!r}; it must be a finite number")
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(
            f"{source}: {key} = {value!r} has type {type(value).__name__}; expected {expected.__name__}"
        )
    return value
