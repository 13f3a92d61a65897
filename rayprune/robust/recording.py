"""Inference passes of the scoring run: per-epoch recording and pool embeddings.

After every epoch the raw (non-EMA) model, in eval mode, sees the un-augmented scored
samples clean and under the training attack; per sample we keep the true-class
probability and margin of both. These rows, stacked over epochs, are the histories
that scores are computed from. The last epoch's pass also keeps the embeddings: with
its statistics, they are the final model's view of the scored samples that
extrapolation works from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayprune.robust.attacks import AttackConfig, pgd_attack
from rayprune.robust.metrics import true_class_stats
from rayprune.robust.models import EmbeddingClassifier
from rayprune.robust.modes import temporary_mode
from rayprune.robust.precision import full_precision


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device

RECORDED_FIELDS = ("p_clean", "p_adv", "margin_clean", "margin_adv", "l2_error_clean", "l2_error_adv")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's per-sample statistics, aligned with the samples given."""

    p_clean: np.ndarray
    p_adv: np.ndarray
    margin_clean: np.ndarray
    margin_adv: np.ndarray
    l2_error_clean: np.ndarray  # ||softmax - onehot||_2, the per-epoch EL2N term
    l2_error_adv: np.ndarray
    #: Penultimate-layer embeddings ``(N, D)`` from the clean pass, when asked for.
    embedding: np.ndarray | None = None


def record_predictions(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackConfig,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    with_embeddings: bool = False,
) -> EpochRecord:
    """Clean and adversarial true-class statistics of ``model`` on float images in [0, 1].

    The attack uses cross-entropy, as during training (``attack.loss`` is overridden).
    The model's mode is restored afterwards. ``with_embeddings`` (an
    :class:`EmbeddingClassifier`) also keeps the clean pass's penultimate embeddings:
    the same forward pass, so no extra compute and the same statistics bit for bit.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length; got {len(images)} and {len(labels)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    embedder: EmbeddingClassifier | None = None
    if with_embeddings:
        if not isinstance(model, EmbeddingClassifier):
            raise TypeError(f"with_embeddings needs an EmbeddingClassifier; got {type(model).__name__}")
        embedder = model
    ce_attack = dataclasses.replace(attack, loss="ce")
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {f: [] for f in RECORDED_FIELDS}
    embeddings: list[torch.Tensor] = []
    with temporary_mode(model, "eval"), full_precision(device):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            x_adv = pgd_attack(model, x, y, ce_attack, generator=generator)
            for kind, inputs in (("clean", x), ("adv", x_adv)):
                with torch.no_grad():
                    if embedder is not None and kind == "clean":
                        logits, emb = embedder.forward_with_embedding(inputs)
                        embeddings.append(emb.float().cpu())
                    else:
                        logits = model(inputs)
                for name, values in prediction_signals(logits, y, kind).items():
                    out[name].append(values.cpu())
    embedding = None
    if embedder is not None:
        embedding = (torch.cat(embeddings).numpy() if embeddings
                     else np.empty((0, embedder.embedding_dim), np.float32))
    return EpochRecord(**{f: torch.cat(v).numpy().astype(np.float32) if v else np.empty(0, np.float32)
                          for f, v in out.items()}, embedding=embedding)


def prediction_signals(logits: torch.Tensor, y: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """``p_<kind>``, ``margin_<kind>`` and ``l2_error_<kind>`` (||softmax - onehot||) per sample."""
    p, m = true_class_stats(logits, y)
    err = (F.softmax(logits.float(), dim=1) - F.one_hot(y, logits.shape[1])).norm(dim=1)
    return {f"p_{kind}": p, f"margin_{kind}": m, f"l2_error_{kind}": err}


def embed_with_signals(model: EmbeddingClassifier, images: torch.Tensor, labels: torch.Tensor,
                       attack: AttackConfig | None = None, *,
                       generator: torch.Generator | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One batch's embeddings and the model's view of each sample, in eval mode.

    The clean signals come from the same forward pass as the embedding; with ``attack``
    (cross-entropy PGD, as the recording pass uses) the adversarial ones too, at the
    attack's cost. Returns float32 ``(B, D)`` embeddings and float32 signal arrays.
    """
    device = next(model.parameters()).device
    x, y = images.to(device), labels.to(device)
    with temporary_mode(model, "eval"), full_precision(_device_of(model)):
        with torch.no_grad():
            logits, emb = model.forward_with_embedding(x)
        signals = prediction_signals(logits, y, "clean")
        if attack is not None:
            x_adv = pgd_attack(model, x, y, dataclasses.replace(attack, loss="ce"), generator=generator)
            with torch.no_grad():
                signals.update(prediction_signals(model(x_adv), y, "adv"))
    return emb.float().cpu().numpy(), {k: v.float().cpu().numpy() for k, v in signals.items()}


def compute_embeddings(model: EmbeddingClassifier, images: torch.Tensor, *, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer embeddings (float32, (N, D)) of float images, in eval mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = next(model.parameters()).device
    parts = []
    with temporary_mode(model, "eval"), full_precision(_device_of(model)), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            parts.append(model.embed(images[start : start + batch_size].to(device)).float().cpu())
    if not parts:
        return np.empty((0, model.embedding_dim), np.float32)
    return torch.cat(parts).numpy()
