"""Run the stages in order, skip finished ones, write the manifest, return the summary.

    pool -> split -> score_subset -> extrapolate -> select -> final_train -> evaluate
                                          (optionally random_baseline -> final_train_random -> evaluate_random)

Everything lives under ``output_dir``; ``manifest.json`` there is written last, and with
``publish_uri`` the finished products are then copied to that URI (``_COMPLETE.json``
last, see :func:`rayprune.storage.publish`). Input problems raise ``InputError``
subclasses (``ConfigError``, ``PoolError``, ``StorageError``), most of them from the
preflight, before anything starts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rayprune import rundir
from rayprune.config import JobConfig, flat_options, to_dict
from rayprune.errors import InputError, one_line, user_error_message
from rayprune.stages.common import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What the job prints at the end (and writes into manifest.json)."""

    pool_size: int = 0
    scored: int = 0
    extrapolated: int = 0
    kept: int = 0
    kept_per_source: dict[str, int] = field(default_factory=dict)
    training_steps: int = 0
    final_training_steps: int = 0
    final_best_epoch: int = -1
    final_data_loading: str = ""  # "memory" or "stream", and why
    robust_metrics: dict[str, float] = field(default_factory=dict)
    evaluation: str = ""
    random_baseline_metrics: dict[str, float] = field(default_factory=dict)
    registered_version: int | None = None
    extrapolation_quality: dict = field(default_factory=dict)
    neighbour_search: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    compute: dict[str, dict[str, int]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    embedded_rows_per_node: dict[str, int] = field(default_factory=dict)
    output_dir: str = ""
    published_uri: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


@contextmanager
def _stage(seconds: dict[str, float], tracker, stage: str):
    """Time a stage (into ``seconds``) and give it a nested MLflow run; yields the run id."""
    start = time.perf_counter()
    logger.info("stage %s ...", stage)
    with tracker.stage(stage) as run_id:
        yield run_id
    seconds[stage] = round(time.perf_counter() - start, 2)
    logger.info("stage %s finished in %.1f s", stage, seconds[stage])


def compute_budget(config: JobConfig, scoring_steps: int, n_prunable: int, n_subset: int, n_pool_train: int,
                   final_steps: int, n_pool: int = 0) -> dict[str, dict[str, int]]:
    """Sample-gradient steps (forward+backward passes per sample) spent vs whole-pool runs.

    An attack of k steps costs k+1 passes per training sample; a recording pass costs k
    attack steps plus two forward passes per sample. "whole_pool" is the same recipe
    without extrapolation (every prunable sample recorded every epoch) and without
    pruning (one pass over the unpruned pool per final epoch: the data-proportional run
    that pruning is meant to make cheaper). ``pool_pass`` is what extrapolation adds: the
    subset model's forward pass over the ``n_pool`` rows for their embeddings (and clean
    signals), plus, for the learned model's ``adv`` signals, an attack on every row.
    """
    k = config.attack.steps
    scoring_train = scoring_steps * config.train.batch_size * (k + 1)
    recording = config.train.epochs * (k + 2)
    ft = config.final.train
    final_full = ft.epochs * math.ceil(n_pool_train / ft.batch_size) * ft.batch_size * (k + 1)
    return {
        "scoring_training": {"spent": scoring_train, "whole_pool": scoring_train},
        "scoring_recording": {"spent": recording * n_subset, "whole_pool": recording * n_prunable},
        "final_training": {"spent": final_steps * ft.batch_size * (k + 1),
                           "whole_pool": final_full if config.final.enabled else 0},
        "pool_pass": {"spent": n_pool * (1 + (k + 1 if adv_pool_pass(config) else 0)), "whole_pool": 0},
    }


def adv_pool_pass(config: JobConfig) -> bool:
    """Whether the pool pass attacks every row (the learned extrapolator's ``adv`` signals)."""
    return config.extrapolation.model == "learned" and config.extrapolation.signals == "adv"


def scoring_budget_warning(config: JobConfig, scoring_steps: int, final_steps: int | None) -> str | None:
    """A warning when the scoring run saw far fewer samples than the final training.

    Scores from a run with too small a step budget can disagree with full-run scores
    while the probe still looks healthy (docs/method.md,
    "The scoring run's budget"): the probe cannot catch this.
    """
    if not final_steps:
        return None
    scoring = scoring_steps * config.train.batch_size
    final = final_steps * config.final.train.batch_size
    if scoring >= 0.5 * final:
        return None
    return (f"the scoring run trained on {scoring:,} samples, {scoring / final:.0%} of the final training's "
            f"{final:,}: scores from a short scoring run can disagree with a full run even when the probe "
            f"correlation looks fine; raise train.epochs or train.steps_per_epoch")


def precision_warning(config: JobConfig, use_gpu: bool) -> str | None:
    """A warning when training runs in reduced precision on CPUs: without bf16/fp16 units
    autocast is emulated (bf16 AT steps ran about 11x slower than fp32 on our 2-core CI machine)."""
    lowered = [f"{name}={train.precision}" for name, train in (("train.precision", config.train),
                                                              ("final.train.precision", config.final.train))
               if train.precision != "fp32"]
    if use_gpu or not lowered:
        return None
    return (f"{', '.join(lowered)} on CPU workers: mixed precision is meant for GPUs, and on CPUs without bf16/fp16 "
            "units it is emulated and much slower than fp32; set it to fp32 for CPU runs")


def publish_products(root: Path, score, extrap, selected, final=None, evaluation=None) -> list[str]:
    """The finished products to publish, relative to ``root``: scores, kept ids, pruned pool,
    quality report, the robust model and its evaluation, and the manifest."""
    from rayprune.stages.extrapolate import QUALITY_FILE
    from rayprune.stages.final import HISTORY_FILE

    paths = [root / "manifest.json", score.scores_file, extrap.scores_dir, extrap.scores_dir.parent / QUALITY_FILE,
             selected.kept_file, selected.pruned_pool]
    if final is not None:
        paths += [final.model_file, final.model_file.with_suffix(".json"), final.model_file.parent / HISTORY_FILE]
    if evaluation is not None:
        paths += [evaluation.per_sample_file.parent / "metrics.json", evaluation.per_sample_file]
    return [Path(p).relative_to(root).as_posix() for p in paths if Path(p).exists()]


@contextmanager
def _naming_unreadable_files(*pools):
    """If the block fails because pyarrow could not decode data, find the pool file at fault
    (a full read of ``pools``) and raise a ``PoolError`` naming it instead; otherwise the
    error passes unchanged. Ray Data's own error only says that a read task failed."""
    from rayprune.data.pool_check import find_unreadable_data
    from rayprune.errors import is_read_failure, user_error_message

    try:
        yield
    except Exception as exc:
        if user_error_message(exc) is None and is_read_failure(exc):
            for pool in pools:
                try:
                    find_unreadable_data(pool)
                except InputError as found:
                    raise found from exc
        raise


def planned_stages(config: JobConfig) -> tuple[str, ...]:
    """The stage directories this config's run writes, in pipeline order."""
    names = ([] if config.pool.path else ["pool"]) + ["split", "score_subset", "extrapolate", "select"]
    if config.final.enabled:
        names += ["final_train"] + ([] if config.evaluation.test_pool else ["test_pool"]) + ["evaluate"]
        if config.final.compare_random:
            names += ["random_baseline", "final_train_random", "evaluate_random"]
    return tuple(names)


def known_facts(config: JobConfig) -> dict[str, str]:
    """The stage inputs besides options that are known before Ray starts: the pools' content."""
    from rayprune.stages.prepare import open_pool

    facts = {"pool": open_pool(config.pool.path).digest if config.pool.path else "demo"}
    if config.final.enabled:
        facts["test pool"] = open_pool(config.evaluation.test_pool).digest if config.evaluation.test_pool else "demo"
    return facts


def stale_stages(config: JobConfig) -> list[rundir.StaleStage]:
    """Kept stage results in the output directory that this run would have to redo."""
    root = Path(config.output_dir).resolve()
    planned = planned_stages(config)
    if not any((root / name).is_dir() for name in planned):
        return []
    return rundir.find_stale_stages(root, planned, flat_options(config), known_facts(config))


def prepare_output_dir(config: JobConfig) -> Path:
    """Mark the output directory as a run and archive or delete stale stage results as
    ``stale_results`` says (the preflight has refused them under ``refuse``)."""
    root = Path(config.output_dir).resolve()
    for stale in stale_stages(config):
        record, _ = rundir.read_record(root / stale.name)
        rundir.set_aside(root / stale.name, record, config.stale_results)
    rundir.claim(root)
    (root / rundir.MANIFEST).unlink(missing_ok=True)  # ours: the directory is a run
    return root


def failure_reason(exc: BaseException) -> str:
    """One line for the MLflow run: the user error's message, or the exception."""
    reason = user_error_message(exc) if isinstance(exc, Exception) else None
    return one_line(reason or f"{type(exc).__name__}: {exc}")[:1000]


def run_pipeline(config: JobConfig) -> RunSummary:
    """Run the whole job on the Ray cluster the config points at (or a local one).

    Bad input is rejected by the preflight before Ray, MLflow or the output directory
    are touched. If the run fails, stages that started and cannot resume are removed
    (nothing half-written looks like progress) and the MLflow run records why.
    """
    from rayprune.preflight import preflight
    from rayprune.tracking.job import make_tracker

    preflight(config)
    root = prepare_output_dir(config)
    tracker = make_tracker(config)
    tracker.start_job(root.name, params=to_dict(config), tags={"output_dir": str(root)})
    try:
        summary = _run_stages(config, root, tracker)
    except BaseException as exc:
        rundir.remove_unfinished(root)
        tracker.set_tags({"failure_reason": failure_reason(exc)})
        tracker.end_job("FAILED")
        raise
    finally:
        from rayprune.stages.resources import release_cluster

        release_cluster(config.ray)
    tracker.end_job("FINISHED")
    return summary


@dataclass
class StageResults:
    """What the stages returned, for the summary, the manifest and publishing."""

    plan: object = None
    pool: object = None
    split: object = None
    score: object = None
    extrap: object = None
    selected: object = None
    final: object = None
    evaluation: object = None
    registration: object = None
    random_evaluation: object = None


def _run_stages(config: JobConfig, root: Path, tracker) -> RunSummary:
    """The stages in order, each timed in its own nested MLflow run; then the summary,
    the manifest and (with ``publish_uri``) the published copy."""
    from rayprune.stages.evaluate import run_evaluate
    from rayprune.stages.extrapolate import run_extrapolate
    from rayprune.stages.final import run_final
    from rayprune.stages.prepare import run_pool, run_split, run_test_pool
    from rayprune.stages.random_baseline import run_random_baseline
    from rayprune.stages.register import run_register
    from rayprune.stages.resources import connect, plan_resources, request_cluster
    from rayprune.stages.score import run_score
    from rayprune.stages.select import run_select
    from rayprune.tracking import job as record

    seconds: dict[str, float] = {}
    r = StageResults()
    connect(config.ray)
    request_cluster(config.ray)
    r.plan = plan = plan_resources(config.ray)
    if warning := precision_warning(config, plan.train_use_gpu):
        logger.warning(warning)
    with _stage(seconds, tracker, "pool"):
        r.pool = pool = run_pool(config, root)
        record.record_pool(tracker, pool)
    with _stage(seconds, tracker, "split"), _naming_unreadable_files(pool.path):
        r.split = run_split(config, pool, root)
        record.record_split(tracker, r.split)
    with _stage(seconds, tracker, "score_subset") as scoring_run_id:
        r.score = run_score(config, pool, r.split, root, plan)
        record.record_score(tracker, r.score)
    with _stage(seconds, tracker, "extrapolate"), _naming_unreadable_files(pool.path):
        r.extrap = run_extrapolate(config, pool, r.split, r.score, root, plan)
        record.record_extrapolate(tracker, r.extrap)
    with _stage(seconds, tracker, "select"), _naming_unreadable_files(pool.path):
        r.selected = run_select(config, pool, r.extrap, root)
        record.record_select(tracker, r.selected, r.extrap)
    if config.final.enabled:
        with _stage(seconds, tracker, "final_train"):
            r.final = run_final(config, pool, r.selected.pruned_pool, {"select": r.selected.digest}, root, plan)
            record.log_final(tracker, r.final.history)
        with _stage(seconds, tracker, "evaluate"):
            test = run_test_pool(config, root)
            with _naming_unreadable_files(test.path):
                r.evaluation = run_evaluate(config, test, r.final.model_file, {"final_train": r.final.digest}, root,
                                            plan)
            record.record_evaluate(tracker, test, r.evaluation)
        with _stage(seconds, tracker, "register"):
            r.registration = run_register(config, tracker, pool, r.selected, r.final, r.evaluation, scoring_run_id,
                                          root)
        if config.final.compare_random:
            with _stage(seconds, tracker, "random_baseline"):
                r.random_evaluation = run_random_baseline(config, pool, r.selected.kept, test, root, plan)
                record.record_random_baseline(tracker, r.random_evaluation)

    summary = build_summary(config, r, root, seconds)
    manifest = build_manifest(config, summary, r, root)
    write_json_atomic(root / "manifest.json", manifest)
    if config.publish_uri:
        publish_run(config, root, r, manifest)
        tracker.set_tags({"published_uri": config.publish_uri})
    record.record_job(tracker, summary)
    tracker.log_artifact(root / "manifest.json")
    return summary


def build_summary(config: JobConfig, r: StageResults, root: Path, seconds: dict[str, float]) -> RunSummary:
    """The job's summary from the stages' results (printed by the CLI, kept in the manifest)."""
    pool, split, score, extrap, selected, final = r.pool, r.split, r.score, r.extrap, r.selected, r.final
    summary = RunSummary(output_dir=str(root), stage_seconds=dict(seconds), published_uri=config.publish_uri)
    summary.pool_size = pool.info.num_rows
    summary.scored = len(split.subset_ids)
    summary.extrapolated = pool.info.num_rows - len(split.subset_ids)
    summary.kept = selected.kept
    summary.kept_per_source = selected.kept_per_source
    summary.training_steps = score.training_steps
    summary.compute = compute_budget(
        config, score.training_steps, split.n_prunable, len(split.subset_ids),
        pool.info.num_rows - (final.n_val if final else 0), final.training_steps if final else 0,
        n_pool=pool.info.num_rows,
    )
    summary.embedded_rows_per_node = extrap.rows_per_node
    summary.extrapolation_quality = extrap.quality.get("chosen") or {}
    summary.neighbour_search = extrap.quality.get("search") or {}
    if warning := precision_warning(config, r.plan.train_use_gpu):
        summary.warnings.append(warning)
    budget_warning = scoring_budget_warning(config, score.training_steps, final.training_steps if final else None)
    if budget_warning:
        logger.warning(budget_warning)
        summary.warnings.append(budget_warning)
    if final is not None:
        summary.final_training_steps = final.training_steps
        summary.final_best_epoch = final.best_epoch
        summary.final_data_loading = f"{final.data_loading}; {final.data_loading_reason}"
        summary.robust_metrics = r.evaluation.metrics
        summary.evaluation = f"{r.evaluation.protocol['protocol']}, {r.evaluation.protocol['label']}"
        if r.evaluation.protocol.get("warning"):
            summary.warnings.append(r.evaluation.protocol["warning"])
        summary.registered_version = r.registration.version if r.registration else None
        summary.outputs.update(final_model=str(final.model_file), evaluation=str(r.evaluation.per_sample_file))
    if r.random_evaluation is not None:
        summary.random_baseline_metrics = r.random_evaluation.metrics
    summary.outputs.update({
        "pool": str(pool.path),
        "scores": str(extrap.scores_dir),
        "subset_embeddings": str(extrap.reference_file),
        "subset_scores": str(score.scores_file),
        "subset_model": str(score.model_file),
        "kept_ids": str(selected.kept_file),
        "pruned_pool": str(selected.pruned_pool),
    })
    return summary


def build_manifest(config: JobConfig, summary: RunSummary, r: StageResults, root: Path) -> dict:
    """``manifest.json``: summary, resolved config, resource plan, digests and every stage's record."""
    return {
        "summary": asdict(summary),
        "config": to_dict(config),
        "resources": asdict(r.plan),
        "digests": {"pool": r.pool.digest, "split": r.split.digest, "score": r.score.digest,
                    "extrapolate": r.extrap.digest, "select": r.selected.digest},
        "final_history": r.final.history if r.final else [],
        "stages": {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/_COMMITTED.json"))},
    }


def publish_run(config: JobConfig, root: Path, r: StageResults, manifest: dict) -> None:
    """Copy the finished products to ``publish_uri``; a failed publish is never claimed."""
    from rayprune.storage import publish

    try:
        publish(root, config.publish_uri, publish_products(root, r.score, r.extrap, r.selected, r.final,
                                                           r.evaluation))
    except BaseException:
        manifest["summary"]["published_uri"] = ""  # the local manifest never claims a failed publish
        write_json_atomic(root / "manifest.json", manifest)
        raise
