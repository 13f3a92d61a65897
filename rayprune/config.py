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

from rayprune.bounds import (
    COUNT_MAX,
    ConfigError,
    OptionError,
    bounded,
    check_ranges,
    field_choices,
    field_range,
    one_of,
    seed_field,
)
from rayprune.choices import (
    AT_LOSSES,
    AUTOATTACK,
    DATA_LOADING,
    EVAL_ATTACKS,
    EVAL_PROTOCOLS,
    METHODS,
    METRICS,
    MODEL_NAMES,
    NORMS,
    PRECISIONS,
    SCHEDULES,
    WEIGHTINGS,
)
from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.scoring.scores import SCORE_NAMES
from rayprune.storage import is_uri

SCORES = SCORE_NAMES
SIGNALS = ("adv", "clean")
STRATEGIES = ("score", "random")
EXTRAPOLATION_MODELS = ("knn", "learned")
LEARNED_SIGNALS = ("clean", "adv")
# What a rerun does with committed stage results whose inputs changed (see stages.common).
STALE_RESULTS = ("refuse", "archive", "delete")
# A config file is a few kilobytes; anything this large is the wrong file (or endless).
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class PoolSection:
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
class RaySection:
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
    train_workers: int = bounded(0, ge=0, le=100_000)
    use_gpu: str = one_of("auto", ("auto", "true", "false"))
    embed_actors: int = bounded(0, ge=0, le=100_000)
    embed_threads: int = bounded(0, ge=0, le=4096)
    extrapolate_actors: int = bounded(0, ge=0, le=100_000)
    inference_batch_size: int = bounded(512, ge=1, le=1 << 20)
    request_cpus: int = bounded(0, ge=0, le=10_000_000)
    request_gpus: int = bounded(0, ge=0, le=1_000_000)
    resource_wait_s: float = bounded(900.0, ge=0, le=7 * 86_400)
    storage_path: str = ""

    def __post_init__(self) -> None:
        check_ranges(self, "ray")


@dataclass(frozen=True)
class SplitSection:
    """The randomly drawn subset of the prunable pool that the scoring run sees."""

    subset_fraction: float = bounded(0.2, gt=0, le=1)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_ranges(self, "split")


@dataclass(frozen=True)
class ModelSection:
    name: str = one_of("small_cnn", MODEL_NAMES)
    width: int = bounded(32, ge=1, le=1024)

    def __post_init__(self) -> None:
        check_ranges(self, "model")


@dataclass(frozen=True)
class AttackSection:
    """The training attack (also used by the recording pass). eps/step in [0,1] pixel units."""

    norm: str = one_of("linf", NORMS)
    eps: float = bounded(8 / 255, ge=0)
    step_size: float = bounded(2 / 255, ge=0)
    steps: int = bounded(5, ge=0, le=100_000)

    def __post_init__(self) -> None:
        check_ranges(self, "attack")
        if self.steps > 0 and self.step_size == 0:
            raise ConfigError("attack.step_size must be > 0 when attack.steps > 0; got 0")
        if self.norm == "linf" and (self.eps > 1 or self.step_size > 1):
            raise ConfigError(f"attack.eps and attack.step_size must be <= 1 for the linf norm (pixels are in [0, 1]); "
                              f"got eps {self.eps!r}, step_size {self.step_size!r}")


@dataclass(frozen=True)
class TrainSection:
    """Adversarial-training recipe of the scoring run.

    ``steps_per_epoch``: optimiser steps per epoch; 0 sizes an epoch as one pass over the
    real part of the pool (over the whole pool if it has no real part), as the paper's
    code does, so the scoring run gets the step budget of a full run, not one pass over
    the small subset. ``batch_size`` is global (split over the training workers).
    ``precision``: ``fp32``, or mixed precision for the training step and the attack that
    makes its examples: ``bf16`` (autocast) or ``fp16`` (autocast and a gradient scaler).
    Evaluation and the recording passes always run in fp32.
    """

    loss: str = one_of("pgd_at", AT_LOSSES)
    trades_beta: float = bounded(5.0, ge=0)
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    epochs: int = bounded(15, ge=1, le=100_000)
    steps_per_epoch: int = bounded(0, ge=0, le=COUNT_MAX)
    batch_size: int = bounded(128, ge=1, le=1 << 20)
    lr: float = bounded(0.1, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(5e-4, ge=0)
    nesterov: bool = True
    schedule: str = one_of("cosine", SCHEDULES)
    warmup_epochs: int = bounded(1, ge=0, le=100_000)
    augment: bool = True
    precision: str = one_of("fp32", PRECISIONS)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_ranges(self, "train")


@dataclass(frozen=True)
class ScoringSection:
    """How recorded histories become scores."""

    score: str = one_of("dynamic_uncertainty", SCORES)
    signal: str = one_of("adv", SIGNALS)
    window: int = bounded(10, ge=1, le=100_000)

    def __post_init__(self) -> None:
        check_ranges(self, "scoring")


@dataclass(frozen=True)
class ExtrapolationSection:
    """kNN extrapolation. ``probe_fraction`` of the scored subset is held out as a probe
    (not used as neighbours) to measure extrapolation quality; ``auto`` picks the
    variant (k, weighting, metric, same_label) with the best probe Spearman correlation.
    ``min_recall``: the ``approx`` and ``ivf`` methods widen their search (efSearch,
    nprobe) until recall@k against exact search reaches it on a sample of queries.
    ``model``: ``knn`` (the published method: the mean score of the k nearest scored
    samples, configured by k/weighting/metric/same_label) or ``learned`` (a regressor
    from the subset model's view of each row plus k-NN estimates to the score; see
    rayprune.scoring.learned). ``signals``: what the learned model sees of each row:
    ``clean`` (from the embedding's own forward pass, free) or ``adv`` (also under the
    training attack: one attack per pool row, counted in the compute budget).
    """

    k: int = bounded(12, ge=1, le=100_000)
    weighting: str = one_of("uniform", WEIGHTINGS)
    metric: str = one_of("euclidean", METRICS)
    method: str = one_of("exact", METHODS)
    same_label: bool = False
    probe_fraction: float = bounded(0.1, ge=0, lt=1)
    auto: bool = False
    min_recall: float = bounded(0.95, gt=0, le=1)
    model: str = one_of("learned", EXTRAPOLATION_MODELS)
    signals: str = one_of("clean", LEARNED_SIGNALS)

    def __post_init__(self) -> None:
        check_ranges(self, "extrapolation")
        if self.auto and self.probe_fraction == 0:
            raise ConfigError("extrapolation.auto needs a probe: set extrapolation.probe_fraction > 0")


@dataclass(frozen=True)
class SelectionSection:
    """``keep_fraction`` of the prunable samples survive; others are always kept."""

    keep_fraction: float = bounded(0.5, gt=0, le=1)
    class_balanced: bool = True
    strategy: str = one_of("score", STRATEGIES)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_ranges(self, "selection")


@dataclass(frozen=True)
class FinalSection:
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
    ``data_loading``: ``memory`` loads each worker's shard into memory before training
    (fastest for small pools); ``stream`` streams the prunable part from Ray Data
    (decoded as it arrives, file order reshuffled every pass, then a local shuffle
    buffer of ``shuffle_buffer`` rows per worker) and keeps only the real part in memory;
    ``auto`` streams when a worker's in-memory shard would exceed ``memory_limit_mib``.
    """

    enabled: bool = True
    train: TrainSection = field(default_factory=TrainSection)
    synthetic_fraction: float = bounded(0.8, ge=0, le=1, special=((-1, "no mixing"),))
    ema_decay: float = bounded(0.995, ge=0, lt=1)
    val_size: int = bounded(256, ge=0, le=COUNT_MAX)
    val_attack_steps: int = bounded(10, ge=0, le=100_000)
    early_stop_patience: int = bounded(0, ge=0, le=100_000)
    compare_random: bool = False
    data_loading: str = one_of("auto", DATA_LOADING)
    memory_limit_mib: int = bounded(2048, ge=0, le=1 << 30)
    shuffle_buffer: int = bounded(10_000, ge=0, le=COUNT_MAX)

    def __post_init__(self) -> None:
        check_ranges(self, "final")


@dataclass(frozen=True)
class EvaluationSection:
    """Robust evaluation of the final model on a held-out test pool.

    ``test_pool``: a pool directory (e.g. CIFAR-10's test batch converted with
    ``rayprune-convert --cifar10-split test``); empty = a demo test split of
    ``demo_test_size`` clean samples drawn like the demo pool's real part. Attacks use
    the job's threat model (``attack.norm``, ``attack.eps``). ``protocol`` ``autoattack``
    runs ``attacks`` as AutoAttack does (each on the samples still robust, in order);
    ``every_attack`` runs each on every clean-correct sample. With the CIFAR-10 presets'
    budgets (APGD and FAB-T 100 steps and 9 target classes, Square 5,000 queries) it is
    AutoAttack's standard version; the defaults are a reduced one for the CPU demo, and
    the summary, metrics and MLflow say so.
    """

    test_pool: str = ""
    demo_test_size: int = bounded(500, ge=1, le=10_000_000)
    attacks: tuple[str, ...] = AUTOATTACK
    protocol: str = one_of("autoattack", EVAL_PROTOCOLS)
    pgd_steps: int = bounded(10, ge=1, le=100_000)
    apgd_steps: int = bounded(25, ge=1, le=100_000)
    apgd_targets: int = bounded(3, ge=1, le=10_000)
    fab_steps: int = bounded(25, ge=1, le=100_000)
    fab_targets: int = bounded(3, ge=1, le=10_000)
    square_queries: int = bounded(500, ge=1, le=1_000_000)
    actors: int = bounded(0, ge=0, le=100_000)
    batch_size: int = bounded(256, ge=1, le=1 << 20)

    def __post_init__(self) -> None:
        check_ranges(self, "evaluation")
        unknown = [a for a in self.attacks if a not in EVAL_ATTACKS]
        if unknown or not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(
                f"evaluation.attacks must name each of its attacks once, from: {', '.join(EVAL_ATTACKS)}; "
                f"got {', '.join(self.attacks) or 'nothing'}"
            )


@dataclass(frozen=True)
class TrackingSection:
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
    stale_results: str = one_of("refuse", STALE_RESULTS)
    pool: PoolSection = field(default_factory=PoolSection)
    split: SplitSection = field(default_factory=SplitSection)
    model: ModelSection = field(default_factory=ModelSection)
    attack: AttackSection = field(default_factory=AttackSection)
    train: TrainSection = field(default_factory=TrainSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    extrapolation: ExtrapolationSection = field(default_factory=ExtrapolationSection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    final: FinalSection = field(default_factory=FinalSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    ray: RaySection = field(default_factory=RaySection)

    def __post_init__(self) -> None:
        check_ranges(self, "")
        if not self.output_dir.strip():
            raise ConfigError(f"output_dir must be a directory path; got {self.output_dir!r}")
        for name, value in (("pool.path", self.pool.path), ("evaluation.test_pool", self.evaluation.test_pool),
                            ("publish_uri", self.publish_uri), ("ray.storage_path", self.ray.storage_path)):
            if value and not value.strip():
                raise ConfigError(f"{name} must be a path or URI, or empty for its default; got {value!r}")
        if self.train.warmup_epochs > self.train.epochs or self.final.train.warmup_epochs > self.final.train.epochs:
            raise ConfigError("train.warmup_epochs (and final.train.warmup_epochs) must be <= the epochs of the same "
                              f"training; got {self.train.warmup_epochs} of {self.train.epochs} and "
                              f"{self.final.train.warmup_epochs} of {self.final.train.epochs}")
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


def flat_options(config) -> dict[str, Any]:
    """The config as ``dotted.key -> value`` with JSON types (lists, not tuples): what stage
    records store and compare."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(to_dict(config), "")
    return out


def select_options(config, *keys: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options under each dotted ``keys`` prefix (a section or one option), minus ``exclude``."""
    flat = flat_options(config)
    picked = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}
    unknown = [p for p in keys if not any(k == p or k.startswith(p + ".") for k in flat)]
    if unknown:  # a programming error: a stage names an option that does not exist
        raise KeyError(f"no config option or section {', '.join(unknown)}")
    return {k: v for k, v in picked.items() if k not in exclude}


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
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
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
    except OptionError as exc:  # name the field by where it sits (final.train.lr, not train.lr)
        raise ConfigError(f"{prefix}{exc.name.rsplit('.', 1)[-1]} {exc.problem}") from None
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


def read_config_text(path: str | Path) -> str:
    """The text of a YAML config file: a regular file of at most ``MAX_CONFIG_BYTES``.

    A FIFO, device or directory is refused before it is opened (reading ``/dev/zero`` or
    a pipe nobody writes to would never end).
    """
    import stat

    if not str(path).strip():
        raise ConfigError(f"--config needs a file path; got {str(path)!r}")
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"config file {path} is not a regular file; give a YAML file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a rayprune config is a "
                          "short YAML file (see configs/)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); give a YAML file") from None


def _bounded_fields(cls=JobConfig, prefix: str = ""):
    """(dotted key, field) of every leaf option."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _bounded_fields(typ, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def option_ranges(cls=JobConfig) -> dict[str, Any]:
    """Every bounded leaf option as ``dotted.key -> Range`` (for --help, the README and tests)."""
    return {key: field_range(f) for key, f in _bounded_fields(cls) if field_range(f) is not None}


def option_choices(cls=JobConfig) -> dict[str, tuple[str, ...]]:
    """Every leaf option with a fixed set of names as ``dotted.key -> choices``."""
    return {key: choices for key, f in _bounded_fields(cls) if (choices := field_choices(f)) is not None}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults <- YAML file <- dotted overrides, validated into a JobConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        text = read_config_text(path)
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
