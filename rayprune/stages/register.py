"""Stage ``register``: the robust model into the MLflow model registry (driver only).

The EMA model is exported as a graph (no pickle; loads without rayprune) and registered
under ``tracking.registered_model``; the version gets the alias ``candidate``, and
``champion`` when its worst-case robust accuracy beats the champion's. Its tags link it
to the pruned dataset, the scoring run and the config; its description says what it was
trained on and how it held up (:func:`model_description`). A rerun whose model is already
registered registers nothing new.
"""

from __future__ import annotations

from pathlib import Path

from rayprune.config import JobConfig, to_dict
from rayprune.stages.common import digest
from rayprune.tracking.job import register_final_model
from rayprune.tracking.registry import MODEL_INPUT, MODEL_OUTPUT


def evaluation_table(metrics: dict[str, float], protocol: dict) -> list[str]:
    """A markdown table of test accuracy per attack. Under the ``autoattack`` protocol each
    row is cumulative (robust to that attack and every one above it), so the last row is
    the reported robust accuracy."""
    cumulative = protocol.get("protocol") == "autoattack"
    head = "robust accuracy (after this and every attack above)" if cumulative else "accuracy under this attack"
    rows = ["| attack | " + head + " |", "|---|---|"]
    names = dict.fromkeys(("clean", *protocol.get("attacks", ())))  # clean first, once
    rows += [f"| {name} | {metrics[name]:.4f} |" for name in names if name in metrics]
    if "worst" in metrics:
        rows.append(f"| **worst case** | **{metrics['worst']:.4f}** |")
    return rows


def model_description(config: JobConfig, pool, selected, evaluation) -> str:
    """The model version's description (markdown): what goes in and out, the pool it was
    trained on, the kept fraction, the scoring recipe, and the per-attack evaluation."""
    ex, sel = config.extrapolation, config.selection
    pool_name = str(pool.path) if config.pool.path else "the generated demo pool"
    kept_share = selected.kept / pool.info.num_rows if pool.info.num_rows else float("nan")
    recipe = (f"{config.scoring.score} on {config.scoring.signal} inputs of a scoring run on "
              f"{config.split.subset_fraction:.0%} of the pool, extrapolated by the {ex.model} model"
              + (f" ({ex.signals} signals)" if ex.model == "learned" else f" (k={ex.k})"))
    protocol = evaluation.protocol
    n = int(evaluation.metrics.get("n", 0))
    lines = [
        f"Robust model trained by rayprune on a pruned pool. Input: {MODEL_INPUT}. Output: {MODEL_OUTPUT}.",
        "",
        f"- pool: {pool_name} ({pool.info.num_rows:,} rows, digest {pool.digest[:12]})",
        f"- kept: {selected.kept:,} rows ({kept_share:.1%} of the pool; selection.keep_fraction "
        f"{sel.keep_fraction:g} of the prunable sources {', '.join(config.pool.prunable_sources)}, "
        f"{'class-balanced' if sel.class_balanced else 'global'}, strategy {sel.strategy})",
        f"- scoring: {recipe}",
        f"- threat model: {config.attack.norm}, eps {config.attack.eps:.6g}",
        f"- evaluation on {n:,} test images: {protocol.get('protocol', '?')}, {protocol.get('label', '')}",
        "",
        *evaluation_table(evaluation.metrics, protocol),
    ]
    if protocol.get("warning"):
        lines += ["", f"Warning: {protocol['warning']}"]
    return "\n".join(lines)


def run_register(config: JobConfig, tracker, pool, selected, final, evaluation, scoring_run_id: str | None,
                 root: Path):
    """Register the final model; returns the registration (None when tracking is off)."""
    return register_final_model(
        tracker, config, final.model_file, pool.info.num_classes, pool.info.image_shape, evaluation.metrics,
        tags={"model_digest": final.digest, "pruned_dataset_digest": selected.digest,
              "scoring_run_id": scoring_run_id or "", "config_digest": digest(to_dict(config)),
              "output_dir": str(root)},
        description=model_description(config, pool, selected, evaluation),
    )
