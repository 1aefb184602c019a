"""One configuration schema for a study, validated on load.

A study file is TOML with two tables, ``[run]`` (federation level) and ``[task]`` (what
each site trains). The same schema travels to Flower as a flat run config with dotted
keys (``run.rounds``, ``task.image-size``), which is what ``[tool.flwr.app.config]``
in pyproject.toml holds, so ``flwr run .`` and ``medgan demo`` read identical settings.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from medgan_core.data.kspace import ACCELERATIONS  # 25 % and 10 % of the k-space lines
from medgan_core.errors import ConfigError

MODALITIES = ("CT", "MR")
DEVICES = ("auto", "cpu", "cuda")
ACCOUNTANTS = ("rdp", "prv")
SR_SCALES = (2, 4)
LR_SCHEDULES = ("constant", "cosine")  # learning rate over a study's rounds (medgan_core.tasks.base.lr_scale)
CYCLE_POOLS = (1, 2, 4)  # cycle: every crop size (a multiple of 4) and image size divides by these
CONDITIONS = ("grade", "severity")  # what conditional synthesis is conditioned on
#: A δ this large lets a mechanism publish a whole record with that probability: refused.
MAX_DELTA = 0.1
POLICIES = ("average", "local", "trimmed-mean", "median")
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi")


def _key(name: str) -> str:
    """Python field name -> config key (``local_steps`` -> ``local-steps``)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class TaskConfig:
    """What every site trains, identical across sites (sent with each round)."""

    name: str = "synthesis"
    modality: str = "CT"
    image_size: int = 64
    batch_size: int = 32
    local_steps: int = 50
    lr_generator: float = 2e-4
    lr_discriminator: float = 2e-4
    z_dim: int = 64
    width: int = 32
    window_low: float = -160.0
    window_high: float = 240.0
    eval_samples: int = 128
    scale: int = 2  # super-resolution factor (superres): 2 or 4
    acceleration: int = 4  # k-space undersampling of compressed-sensing MR (recon): 4 or 10
    condition: str = "grade"  # conditional: lesion-burden grade 0-3 (a class) or the burden itself
    l1_weight: float = 100.0  # image-to-image tasks: weight of the L1 fidelity term beside the adversarial one
    ssim_weight: float = 0.0  # paired image-to-image tasks: weight of a (1 - SSIM) term to the target (0: none)
    lr_schedule: str = "constant"  # both learning rates over the study's rounds: constant, or cosine down to 1/10
    identity_weight: float = 5.0  # cycle: weight of the identity loss (CycleGAN's 0.5 × the cycle weight; 0: off)
    crop_size: int = 0  # cycle: train on random crops of this size (0: whole slices)
    cycle_pool: int = 1  # cycle: compare the cycle's round trip after average pooling by this factor (1: per pixel)
    tv_weight: float = 0.0  # cycle: weight of a total-variation penalty on each translated image (0: off)
    seed: int = 0

    def validate(self) -> None:
        from medgan_core.tasks.registry import task_class, task_names

        if self.name not in task_names():
            raise ConfigError(
                f"task.name = {self.name!r} is not a known task; choose one of {', '.join(task_names())}"
            )
        if self.modality not in MODALITIES:
            raise ConfigError(f"task.modality = {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        size = self.image_size
        if size < 16 or size > 256 or size & (size - 1):
            raise ConfigError(f"task.image-size = {size}; it must be a power of two from 16 to 256")
        _positive("task.batch-size", self.batch_size)
        _positive("task.local-steps", self.local_steps)
        _positive("task.z-dim", self.z_dim)
        _positive("task.width", self.width)
        _positive("task.eval-samples", self.eval_samples)
        _positive("task.l1-weight", self.l1_weight)
        if self.ssim_weight < 0:
            raise ConfigError(f"task.ssim-weight = {self.ssim_weight}; it must be 0 (off) or a positive number")
        if self.ssim_weight > 0 and "ssim-weight" not in task_class(self.name).target_loss_keys:
            raise ConfigError(f"task.ssim-weight = {self.ssim_weight}, but task {self.name!r} has no paired target "
                              "to compare with and would ignore it; set it to 0 or use a paired image-to-image task")
        if self.identity_weight < 0:
            raise ConfigError(f"task.identity-weight = {self.identity_weight}; it must be 0 (off) or a positive number")
        if self.crop_size:
            if not task_class(self.name).trains_on_crops:
                raise ConfigError(f"task.crop-size = {self.crop_size}, but task {self.name!r} trains on whole slices; "
                                  "set it to 0 (crops are for 'cycle', whose losses need no paired target)")
            if self.crop_size % 4 or not 16 <= self.crop_size <= self.image_size:
                raise ConfigError(f"task.crop-size = {self.crop_size}; it must be 0 (whole slices) or a multiple of 4 "
                                  f"from 16 to task.image-size ({self.image_size})")
        if self.cycle_pool not in CYCLE_POOLS:
            raise ConfigError(f"task.cycle-pool = {self.cycle_pool}; choose one of {', '.join(map(str, CYCLE_POOLS))}")
        if self.tv_weight < 0:
            raise ConfigError(f"task.tv-weight = {self.tv_weight}; it must be 0 (off) or a positive number")
        if self.name != "cycle" and (self.cycle_pool != 1 or self.tv_weight):
            raise ConfigError(f"task.cycle-pool and task.tv-weight shape CycleGAN's losses, but task {self.name!r} "
                              "would ignore them; leave them at 1 and 0")
        if self.width % 8:
            raise ConfigError(f"task.width = {self.width}; it must be a multiple of 8 (GroupNorm groups)")
        if self.scale not in SR_SCALES:
            raise ConfigError(f"task.scale = {self.scale}; choose one of {', '.join(map(str, SR_SCALES))}")
        if self.acceleration not in ACCELERATIONS:
            raise ConfigError(
                f"task.acceleration = {self.acceleration}; choose one of {', '.join(map(str, ACCELERATIONS))}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"task.lr-schedule = {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"task.condition = {self.condition!r}; choose one of {', '.join(CONDITIONS)}")
        if self.name == "cycle" and self.modality != "CT":
            raise ConfigError("task.name = 'cycle' harmonises a site's two CT scanners: set task.modality = 'CT'")
        if self.name == "recon" and self.modality != "MR":
            raise ConfigError("task.name = 'recon' reconstructs MR k-space: set task.modality = 'MR'")
        for key, lr in (("task.lr-generator", self.lr_generator), ("task.lr-discriminator", self.lr_discriminator)):
            if not 0 < lr < 1:
                raise ConfigError(f"{key} = {lr}; a learning rate must lie in (0, 1)")
        if self.window_high <= self.window_low:
            raise ConfigError(
                f"task.window-high ({self.window_high}) must be above task.window-low ({self.window_low})"
            )


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

    def validate(self) -> None:
        _positive("run.rounds", self.rounds)
        _positive("run.round-timeout", self.round_timeout)
        _positive("run.num-sites", self.num_sites)
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
    applies FedAdam/FedYogi (Flower's) to the averaged update;
    ``proximal-mu`` > 0 pulls each site's weights back towards the global model (FedProx);
    ``keep-optimizer-state`` carries each site's Adam moments from round to round.
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
    proximal_mu: float = 0.0
    keep_optimizer_state: bool = False

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
    def has_site_state(self) -> bool:
        """Whether sites must keep weights or optimiser state between rounds."""
        overrides = self.overrides()
        return (self.local_norm or self.local_calibration or self.keep_optimizer_state
                or "local" in (self.policy, *overrides.values()))

    def validate(self) -> None:
        for key, value in (("aggregation.policy", self.policy), *(
            (f"aggregation.group-policies ({group})", policy) for group, policy in self.overrides().items()
        )):
            if value not in POLICIES:
                raise ConfigError(f"{key} = {value!r}; choose one of {', '.join(POLICIES)}")
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
        if self.proximal_mu < 0:
            raise ConfigError(f"aggregation.proximal-mu = {self.proximal_mu}; it must be >= 0 (0 = no FedProx term)")


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings; they never leave the site.

    In deployment they come from the SuperNode's node config (``data-path``,
    ``state-dir``, ``device``, ``epsilon-budget``, ``site-name``); in simulation from the
    study's site folders.
    """

    data_path: str
    name: str = ""
    state_dir: str = ""
    device: str = "auto"
    epsilon_budget: float = 0.0  # 0: the study's privacy.target-epsilon
    # The site's privacy policy: what the coordinator's study may not lower. The Python
    # defaults let the study decide (simulation: one researcher owns every site); a
    # deployed site's site.toml and node config default to the strict HOSPITAL_POLICY.
    require_dp: bool = False
    require_secure_rng: bool = False
    max_delta: float = MAX_DELTA
    release_test_metrics: bool = True  # held-out scores (of the test split, outside ε) may leave
    app_hash: str = ""  # deployed: study-app SHA-256s this site runs, comma-separated ("": the app installed here)

    @property
    def site_name(self) -> str:
        return self.name or Path(self.data_path).name

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
        return ""

    def validate(self) -> "SiteConfig":
        if not self.data_path:
            raise ConfigError("site data-path is empty; name the folder that holds the site's manifest.csv")
        if self.device not in DEVICES:
            raise ConfigError(f"site device = {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not math.isfinite(self.epsilon_budget) or self.epsilon_budget < 0:
            raise ConfigError(f"site epsilon-budget = {self.epsilon_budget}; it must be >= 0 (0 = the study's target)")
        if not 0 < self.max_delta <= MAX_DELTA:
            raise ConfigError(f"site max-delta = {self.max_delta}; it must lie in (0, {MAX_DELTA:g}]")
        return self


#: What a hospital's site.toml (and a deployed SuperNode's node config) defaults to: DP
#: required, secret noise required, δ at most 1e-5, held-out scores kept at the site.
HOSPITAL_POLICY = {"require-dp": True, "require-secure-rng": True, "max-delta": 1e-5, "release-test-metrics": False}


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


def _load_tables(path: str | Path, allowed: tuple[str, ...]) -> dict[str, Any]:
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
    raw = _load_tables(path, ("site", "connection"))
    site_items = dict(raw.get("site", {}))
    if "data-path" not in site_items:
        raise ConfigError(f"{path}: [site] needs data-path, the folder that holds the site's manifest.csv")
    site = _build(SiteConfig, {"data-path": "", **HOSPITAL_POLICY, **site_items}, "site", str(path))
    connection = _build(ConnectionConfig, raw.get("connection", {}), "connection", str(path))
    base = path.parent
    site = dataclasses.replace(site, data_path=_resolve(base, site.data_path), state_dir=_resolve(base, site.state_dir))
    connection = dataclasses.replace(connection, ca_cert=_resolve(base, connection.ca_cert),
                                     private_key=_resolve(base, connection.private_key))
    return site.validate(), connection.validate()


def load_coordinator(path: str | Path) -> CoordinatorConfig:
    """The coordinator's coordinator.toml: one ``[coordinator]`` table."""
    path = Path(path)
    raw = _load_tables(path, ("coordinator",))
    config = _build(CoordinatorConfig, raw.get("coordinator", {}), "coordinator", str(path))
    base = path.parent
    return dataclasses.replace(config, certs_dir=_resolve(base, config.certs_dir),
                               database=_resolve(base, config.database)).validate()


TABLES = ("run", "task", "privacy", "aggregation")


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: the run, the task, privacy and aggregation settings."""

    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    def validate(self) -> "StudyConfig":
        self.run.validate()
        self.task.validate()
        self.privacy.validate()
        self.aggregation.validate()
        agg = self.aggregation
        robust = sorted({p for p in (agg.policy, *agg.overrides().values()) if p in ("trimmed-mean", "median")})
        if self.privacy.central_noise_multiplier > 0 and robust:
            raise ConfigError(
                f"aggregation policy {robust[0]!r} cannot be combined with privacy.central-noise-multiplier: "
                "central DP needs an equal-weight mean of clipped updates"
            )
        if self.privacy.secagg and (robust or agg.has_site_state or agg.server_optimizer != "fedavg"
                                    or agg.proximal_mu > 0):
            raise ConfigError(
                "privacy.secagg supports plain averaging only: leave [aggregation] at its defaults "
                "(secure aggregation hides individual updates, so robust or per-site policies cannot see them)"
            )
        return self

    # --- nested dict (TOML) -------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "StudyConfig":
        unknown = set(raw) - set(TABLES)
        if unknown:
            raise ConfigError(
                f"{source}: unknown table(s) {sorted(unknown)}; allowed: {', '.join(f'[{t}]' for t in TABLES)}"
            )
        run = _build(RunConfig, raw.get("run", {}), "run", source)
        task = _build(TaskConfig, raw.get("task", {}), "task", source)
        privacy = _build(PrivacyConfig, raw.get("privacy", {}), "privacy", source)
        aggregation = _build(AggregationConfig, raw.get("aggregation", {}), "aggregation", source)
        return cls(run=run, task=task, privacy=privacy, aggregation=aggregation).validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            table: {_key(k): v for k, v in dataclasses.asdict(getattr(self, table)).items()} for table in TABLES
        }

    # --- flat dotted dict (Flower run config) ----------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], source: str = "run config") -> "StudyConfig":
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            table, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"{source}: key {key!r} must be TABLE.NAME with TABLE one of {', '.join(TABLES)}")
            nested.setdefault(table, {})[name] = value
        return cls.from_dict(nested, source)

    def to_flat(self) -> dict[str, Any]:
        return {f"{table}.{k}": v for table, values in self.to_dict().items() for k, v in values.items()}

    def replace(
        self,
        run: Mapping[str, Any] | None = None,
        task: Mapping[str, Any] | None = None,
        privacy: Mapping[str, Any] | None = None,
        aggregation: Mapping[str, Any] | None = None,
    ) -> "StudyConfig":
        """A copy with some fields changed (Python field names), validated again."""
        return StudyConfig(
            run=dataclasses.replace(self.run, **(run or {})),
            task=dataclasses.replace(self.task, **(task or {})),
            privacy=dataclasses.replace(self.privacy, **(privacy or {})),
            aggregation=dataclasses.replace(self.aggregation, **(aggregation or {})),
        ).validate()


def _table_from_flat(cls: type, table: str, flat: Mapping[str, Any]) -> Any:
    items = {k[len(table) + 1:]: v for k, v in flat.items() if k.startswith(f"{table}.")}
    config = _build(cls, items, table, "round config")
    config.validate()
    return config


def task_config_from_flat(flat: Mapping[str, Any]) -> TaskConfig:
    """Rebuild the task config a client receives in a round's ConfigRecord."""
    return _table_from_flat(TaskConfig, "task", flat)


def privacy_config_from_flat(flat: Mapping[str, Any]) -> PrivacyConfig:
    """Rebuild the privacy settings a client receives in a round's ConfigRecord."""
    return _table_from_flat(PrivacyConfig, "privacy", flat)


def aggregation_config_from_flat(flat: Mapping[str, Any]) -> AggregationConfig:
    """Rebuild the aggregation settings a client receives (keys absent: the defaults)."""
    return _table_from_flat(AggregationConfig, "aggregation", flat)


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file ([run], [task], [privacy])."""
    return StudyConfig.from_dict(_load_tables(path, TABLES), str(path))


def dump_study(config: StudyConfig) -> str:
    return tomli_w.dumps(config.to_dict())


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} = {value}; it must be a positive number")


def _build(cls: type, values: Mapping[str, Any], table: str, source: str) -> Any:
    """Make a dataclass from config keys, naming any unknown key or wrong type."""
    by_key = {_key(f.name): f for f in fields(cls)}
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
