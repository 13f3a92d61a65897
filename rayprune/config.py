"""Typed job configuration: dataclasses, YAML files, dotted command-line overrides.

One ``JobConfig`` travels from the command line to every stage. It is built from the
defaults, then a YAML file (``--config``), then ``--section.field value`` overrides, in
that order. Unknown keys are errors at every level, so a typo never silently falls back
to a default. ``to_dict`` gives the fully resolved config for manifests and logs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.errors import InputError
from rayprune.choices import AT_LOSSES, EVAL_ATTACKS, METHODS, METRICS, MODEL_NAMES, NORMS, SCHEDULES, WEIGHTINGS
from rayprune.scoring.scores import SCORE_NAMES
from rayprune.storage import is_uri
from rayprune.validation import check_choice, check_fraction

SCORES = SCORE_NAMES
SIGNALS = ("adv", "clean")
STRATEGIES = ("score", "random")


class ConfigError(InputError):
    """A configuration value or key that is not allowed; the message names it."""


@dataclass(frozen=True)
class PoolConfig:
    """Where the pool comes from and which of its sources may be pruned.

    ``path``: a pool directory (see ``rayprune.data.pool``); empty = generate the demo
    pool described by ``demo`` into ``<output_dir>/pool``.
    """

    path: str = ""
    demo: DemoPoolSpec = field(default_factory=DemoPoolSpec)
    prunable_sources: tuple[str, ...] = ("synthetic",)

    def __post_init__(self) -> None:
        if not self.prunable_sources:
            raise ConfigError("pool.prunable_sources must name at least one source (e.g. synthetic)")


@dataclass(frozen=True)
class RayConfig:
    """How the job uses the Ray cluster; 0 / "auto" values are sized from its resources.

    ``address``: empty = the ``RAY_ADDRESS`` environment variable if set (as under
    ``ray job submit``), else a local Ray instance started for the job.
    ``request_cpus`` / ``request_gpus``: on an autoscaling cluster that starts with no
    workers, ask the autoscaler for this many CPUs / GPUs (cluster totals) and wait up
    to ``resource_wait_s`` seconds for them before sizing the job; 0 = use what is there.
    ``storage_path``: where Ray Train keeps its checkpoints, a URI (s3://, gs://) or a
    path every node sees; empty = ``<output_dir>/<stage>/train``.
    ``embed_threads``: torch threads per embedding actor; 0 = fill the cluster's CPUs
    (total CPUs / embedding actors, at most one node's CPUs) on CPU, 1 per GPU actor.
    """

    address: str = ""
    train_workers: int = 0
    use_gpu: str = "auto"
    embed_actors: int = 0
    embed_threads: int = 0
    extrapolate_actors: int = 0
    inference_batch_size: int = 512
    request_cpus: int = 0
    request_gpus: int = 0
    resource_wait_s: float = 900.0
    storage_path: str = ""

    def __post_init__(self) -> None:
        _wrap(check_choice, self.use_gpu, "ray.use_gpu", ("auto", "true", "false"))
        for name in ("train_workers", "embed_actors", "embed_threads", "extrapolate_actors", "request_cpus",
                     "request_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ray.{name} must be >= 0 (0 = size from the cluster); got {getattr(self, name)}")
        if self.inference_batch_size < 1:
            raise ConfigError(f"ray.inference_batch_size must be >= 1; got {self.inference_batch_size}")
        if self.resource_wait_s < 0:
            raise ConfigError(f"ray.resource_wait_s must be >= 0 seconds; got {self.resource_wait_s}")


@dataclass(frozen=True)
class SplitConfig:
    """The randomly drawn subset of the prunable pool that the scoring run sees."""

    subset_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _wrap(check_fraction, self.subset_fraction, "split.subset_fraction")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"
    width: int = 32

    def __post_init__(self) -> None:
        _wrap(check_choice, self.name, "model.name", MODEL_NAMES)


@dataclass(frozen=True)
class AttackSettings:
    """The training attack (also used by the recording pass). eps/step in [0,1] pixel units."""

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 5

    def __post_init__(self) -> None:
        _wrap(check_choice, self.norm, "attack.norm", NORMS)
        if not self.eps >= 0 or self.steps < 0 or (self.steps > 0 and not self.step_size > 0):
            raise ConfigError("attack: eps must be >= 0, steps >= 0 and step_size > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Adversarial-training recipe of the scoring run.

    ``steps_per_epoch``: optimiser steps per epoch; 0 sizes an epoch as one pass over the
    real part of the pool (over the whole pool if it has no real part), as the paper's
    code does, so the scoring run gets the step budget of a full run, not one pass over
    the small subset. ``batch_size`` is global (split over the training workers).
    """

    loss: str = "pgd_at"
    trades_beta: float = 5.0
    label_smoothing: float = 0.0
    epochs: int = 15
    steps_per_epoch: int = 0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    warmup_epochs: int = 1
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _wrap(check_choice, self.loss, "train.loss", AT_LOSSES)
        _wrap(check_choice, self.schedule, "train.schedule", SCHEDULES)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1; got {getattr(self, name)}")
        if self.steps_per_epoch < 0:
            raise ConfigError(f"train.steps_per_epoch must be >= 0 (0 = size by the real data); got {self.steps_per_epoch}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0; got {self.lr}")


@dataclass(frozen=True)
class ScoringConfig:
    """How recorded histories become scores."""

    score: str = "dynamic_uncertainty"
    signal: str = "adv"
    window: int = 10

    def __post_init__(self) -> None:
        _wrap(check_choice, self.score, "scoring.score", SCORES)
        _wrap(check_choice, self.signal, "scoring.signal", SIGNALS)


@dataclass(frozen=True)
class ExtrapolationSettings:
    """kNN extrapolation. ``probe_fraction`` of the scored subset is held out as a probe
    (not used as neighbours) to measure extrapolation quality; ``auto`` picks the
    variant (k, weighting, metric, same_label) with the best probe Spearman correlation.
    """

    k: int = 12
    weighting: str = "uniform"
    metric: str = "euclidean"
    method: str = "exact"
    same_label: bool = False
    probe_fraction: float = 0.1
    auto: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.probe_fraction < 1.0:
            raise ConfigError(f"extrapolation.probe_fraction must be in [0, 1); got {self.probe_fraction}")
        if self.auto and self.probe_fraction == 0:
            raise ConfigError("extrapolation.auto needs a probe: set extrapolation.probe_fraction > 0")
        if self.k < 1:
            raise ConfigError(f"extrapolation.k must be >= 1; got {self.k}")
        _wrap(check_choice, self.weighting, "extrapolation.weighting", WEIGHTINGS)
        _wrap(check_choice, self.metric, "extrapolation.metric", METRICS)
        _wrap(check_choice, self.method, "extrapolation.method", METHODS)


@dataclass(frozen=True)
class SelectionConfig:
    """``keep_fraction`` of the prunable samples survive; others are always kept."""

    keep_fraction: float = 0.5
    class_balanced: bool = True
    strategy: str = "score"
    seed: int = 0

    def __post_init__(self) -> None:
        _wrap(check_fraction, self.keep_fraction, "selection.keep_fraction")
        _wrap(check_choice, self.strategy, "selection.strategy", STRATEGIES)


@dataclass(frozen=True)
class FinalConfig:
    """The robust model: adversarial training on the pruned pool (skip with enabled=false).

    ``train`` is the same recipe as the scoring run's, and its budget is explicit:
    ``steps_per_epoch`` = 0 means one pass over the real (non-prunable) samples per
    epoch, as in the paper, whatever the pruned pool's size; the manifest compares the
    steps spent with a whole-pool run (one pass over the unpruned pool per epoch).
    ``synthetic_fraction`` of each batch comes from the prunable sources
    (the paper uses 0.8); -1 samples uniformly from the pruned pool. ``val_size`` real
    samples (the lowest ids) are held out for validation and early stopping on the EMA
    model's robust accuracy (PGD-``val_attack_steps`` with the CW loss).
    ``compare_random``: also train on a random pruning of the same size and budget.
    """

    enabled: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic_fraction: float = 0.8
    ema_decay: float = 0.995
    val_size: int = 256
    val_attack_steps: int = 10
    early_stop_patience: int = 0
    compare_random: bool = False

    def __post_init__(self) -> None:
        if not (self.synthetic_fraction == -1 or 0.0 <= self.synthetic_fraction <= 1.0):
            raise ConfigError(f"final.synthetic_fraction must be in [0, 1] or -1 (no mixing); got {self.synthetic_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"final.ema_decay must be in [0, 1); got {self.ema_decay}")
        for name in ("val_size", "val_attack_steps", "early_stop_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"final.{name} must be >= 0; got {getattr(self, name)}")


@dataclass(frozen=True)
class EvaluationConfig:
    """Robust evaluation of the final model on a held-out test pool.

    ``test_pool``: a pool directory (e.g. CIFAR-10's test batch converted with
    ``rayprune-convert --cifar10-split test``); empty = a demo test split of
    ``demo_test_size`` clean samples drawn like the demo pool's real part. Attacks use
    the job's threat model (``attack.norm``, ``attack.eps``). The defaults are a
    reduced evaluation that fits the CPU demo (500 samples, APGD 25 steps, 3 target
    classes); the CIFAR-10 presets use AutoAttack's standard APGD-CE and APGD-T settings
    (100 steps, 9 target classes). FAB-T and Square are not run, so "worst" is an upper
    bound on full AutoAttack robust accuracy.
    """

    test_pool: str = ""
    demo_test_size: int = 500
    attacks: tuple[str, ...] = ("clean", "pgd_ce", "pgd_cw", "apgd_ce", "apgd_t")
    pgd_steps: int = 10
    apgd_steps: int = 25
    apgd_targets: int = 3
    actors: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("demo_test_size", "pgd_steps", "apgd_steps", "apgd_targets", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name} must be >= 1; got {getattr(self, name)}")
        if self.actors < 0:
            raise ConfigError(f"evaluation.actors must be >= 0 (0 = size from the cluster); got {self.actors}")
        unknown = [a for a in self.attacks if a not in EVAL_ATTACKS]
        if unknown or not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(
                f"evaluation.attacks must name each of its attacks once, from: {', '.join(EVAL_ATTACKS)}; "
                f"got {', '.join(self.attacks) or 'nothing'}"
            )


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: empty ``uri`` = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "rayprune"
    registered_model: str = "rayprune-robust"
    strict: bool = False

    def __post_init__(self) -> None:
        for name in ("experiment", "registered_model"):
            if not getattr(self, name).strip():
                raise ConfigError(f"tracking.{name} must be a non-empty name")


@dataclass(frozen=True)
class JobConfig:
    """The whole job. ``output_dir`` is a local or shared POSIX path (NFS, EFS): its commit
    markers need atomic renames. ``publish_uri`` (a URI such as s3://bucket/run, or a path):
    when set, the finished products are copied there at the end, ``_COMPLETE.json`` last.
    """

    output_dir: str = "outputs/demo"
    publish_uri: str = ""
    pool: PoolConfig = field(default_factory=PoolConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackSettings = field(default_factory=AttackSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    extrapolation: ExtrapolationSettings = field(default_factory=ExtrapolationSettings)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if is_uri(self.output_dir):
            raise ConfigError(
                f"output_dir must be a local or shared POSIX path (its commit markers need atomic renames); got "
                f"{self.output_dir}: write to a path and set publish_uri to copy the products to a URI"
            )
        if self.scoring.score in ("dynamic_uncertainty",) and self.scoring.window >= self.train.epochs:
            raise ConfigError(
                f"scoring.window ({self.scoring.window}) must be smaller than train.epochs ({self.train.epochs}): "
                f"Dynamic Uncertainty needs more epochs than its window"
            )


def _wrap(check, value, name, *args):
    try:
        return check(value, name, *args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ------------------------------------------------------------------ dict <-> dataclass


def to_dict(config) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML/JSON-ready)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert a YAML or CLI value to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(typ) if t is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], key)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(typ)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return tuple(_coerce(v, inner, key) for v in items if v != "")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer; got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        try:
            return float(_fraction(value) if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number; got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - programming error


def _fraction(text: str) -> float:
    """Parse "0.03", "8/255" or "2e-3" (fractions keep eps settings readable)."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from nested dicts; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping; got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def flat_fields(cls=JobConfig, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every leaf option as ``dotted.key -> (type, default)``: the CLI is built from it."""
    out = {}
    defaults = cls()
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(flat_fields(typ, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (typ, getattr(defaults, f.name))
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c = value`` inside nested dicts, creating levels as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults <- YAML file <- dotted overrides, validated into a JobConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return from_dict(JobConfig, data)
