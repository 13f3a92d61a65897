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
from rayprune.stages.common import digest, write_json_atomic

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
    robust_metrics: dict[str, float] = field(default_factory=dict)
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
def _stage(summary: RunSummary, tracker, stage: str):
    """Time a stage for the summary and give it a nested MLflow run; yields the run id."""
    start = time.perf_counter()
    logger.info("stage %s ...", stage)
    with tracker.stage(stage) as run_id:
        yield run_id
    summary.stage_seconds[stage] = round(time.perf_counter() - start, 2)
    logger.info("stage %s finished in %.1f s", stage, summary.stage_seconds[stage])


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
    while the probe still looks healthy (method.md): the probe cannot catch this.
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


def _run_stages(config: JobConfig, root: Path, tracker) -> RunSummary:
    from rayprune.data.pool import read_pool_info
    from rayprune.stages.evaluate import run_evaluate
    from rayprune.stages.extrapolate import run_extrapolate
    from rayprune.stages.final import run_final, write_random_pool
    from rayprune.stages.prepare import run_pool, run_split, run_test_pool
    from rayprune.stages.resources import connect, plan_resources, request_cluster
    from rayprune.stages.score import run_score
    from rayprune.stages.select import run_select
    from rayprune.tracking import job as jt

    summary = RunSummary(output_dir=str(root))
    connect(config.ray)
    request_cluster(config.ray)
    plan = plan_resources(config.ray)
    with _stage(summary, tracker, "pool"):
        pool = run_pool(config, root)
        jt.log_pool_dataset(tracker, "pool", pool.info, pool.digest, pool.path, "pool")
    with _stage(summary, tracker, "split"), _naming_unreadable_files(pool.path):
        split = run_split(config, pool, root)
        tracker.log_dataset("scored subset", digest=split.digest, source=str(split.subset_dir), context="scoring",
                            num_rows=len(split.subset_ids), schema=jt.POOL_SCHEMA)
    with _stage(summary, tracker, "score_subset") as scoring_run_id:
        score = run_score(config, pool, split, root, plan)
        jt.log_history(tracker, score.history, ("loss", "lr", "clean_acc", "adv_acc"))
    with _stage(summary, tracker, "extrapolate"), _naming_unreadable_files(pool.path):
        extrap = run_extrapolate(config, pool, split, score, root, plan)
        jt.log_scores(tracker, extrap.scores_dir)
        jt.log_probe(tracker, extrap.quality, extrap.probe_file)
        search = extrap.quality.get("search") or {}
        if search:
            tracker.log_metrics({"search_recall": search["recall"]})
            tracker.set_tags({"search_method": search["method"], "search_width": search["search_width"]})
    with _stage(summary, tracker, "select"), _naming_unreadable_files(pool.path):
        selected = run_select(config, pool, extrap, root)
        jt.log_pool_dataset(tracker, "pruned pool", read_pool_info(selected.pruned_pool), selected.digest,
                            selected.pruned_pool, "training")
        jt.log_selection(tracker, selected.kept_file, extrap.scores_dir)

    final = evaluation = None
    if config.final.enabled:
        with _stage(summary, tracker, "final_train"):
            final = run_final(config, pool, selected.pruned_pool, {"select": selected.digest}, root, plan)
            jt.log_final(tracker, final.history)
        with _stage(summary, tracker, "evaluate"):
            test = run_test_pool(config, root)
            with _naming_unreadable_files(test.path):
                evaluation = run_evaluate(config, test, final.model_file, {"final_train": final.digest}, root, plan)
            jt.log_pool_dataset(tracker, "test set", test.info, test.digest, test.path, "evaluation")
            tracker.log_metrics({f"test_{k}": v for k, v in evaluation.metrics.items()})
        with _stage(summary, tracker, "register"):
            registration = jt.register_final_model(
                tracker, config, final.model_file, pool.info.num_classes, pool.info.image_shape, evaluation.metrics,
                tags={"model_digest": final.digest, "pruned_dataset_digest": selected.digest,
                      "scoring_run_id": scoring_run_id or "",
                      "config_digest": digest(to_dict(config)), "output_dir": str(root)},
            )
        summary.final_training_steps = final.training_steps
        summary.final_best_epoch = final.best_epoch
        summary.robust_metrics = evaluation.metrics
        summary.registered_version = registration.version if registration else None
        summary.outputs.update(final_model=str(final.model_file), evaluation=str(evaluation.per_sample_file))
        if config.final.compare_random:
            with _stage(summary, tracker, "random_baseline"):
                random_pool, random_digest = write_random_pool(config, pool, selected.kept, root)
                random_final = run_final(config, pool, random_pool, {"random_baseline": random_digest}, root, plan,
                                         name="final_train_random")
                random_eval = run_evaluate(config, test, random_final.model_file,
                                           {"final_train_random": random_final.digest}, root, plan,
                                           name="evaluate_random")
                tracker.log_metrics({f"test_{k}": v for k, v in random_eval.metrics.items()})
            summary.random_baseline_metrics = random_eval.metrics

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
    budget_warning = scoring_budget_warning(config, score.training_steps, final.training_steps if final else None)
    if budget_warning:
        logger.warning(budget_warning)
        summary.warnings.append(budget_warning)
    summary.outputs.update({
        "pool": str(pool.path),
        "scores": str(extrap.scores_dir),
        "subset_embeddings": str(extrap.reference_file),
        "subset_scores": str(score.scores_file),
        "subset_model": str(score.model_file),
        "kept_ids": str(selected.kept_file),
        "pruned_pool": str(selected.pruned_pool),
    })
    summary.published_uri = config.publish_uri
    manifest = {
        "summary": asdict(summary),
        "config": to_dict(config),
        "resources": asdict(plan),
        "digests": {"pool": pool.digest, "split": split.digest, "score": score.digest,
                    "extrapolate": extrap.digest, "select": selected.digest},
        "final_history": final.history if final else [],
        "stages": {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/_COMMITTED.json"))},
    }
    write_json_atomic(root / "manifest.json", manifest)
    if config.publish_uri:
        from rayprune.storage import publish

        try:
            publish(root, config.publish_uri, publish_products(root, score, extrap, selected, final, evaluation))
        except BaseException:
            manifest["summary"]["published_uri"] = ""  # the local manifest never claims a failed publish
            write_json_atomic(root / "manifest.json", manifest)
            raise
        tracker.set_tags({"published_uri": config.publish_uri})
    tracker.log_metrics({"pool_size": summary.pool_size, "scored": summary.scored, "kept": summary.kept,
                         **{f"sample_gradient_steps_{k}": v["spent"] for k, v in summary.compute.items()},
                         **{f"sample_gradient_steps_{k}_whole_pool": v["whole_pool"] for k, v in summary.compute.items()},
                         **{f"stage_seconds_{k}": v for k, v in summary.stage_seconds.items()}})
    tracker.log_artifact(root / "manifest.json")
    return summary
