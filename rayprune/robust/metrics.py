"""Per-sample prediction statistics recorded into score histories."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def true_class_stats(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(p_true, margin)``, each of shape ``(B,)``.

    ``p_true`` is the softmax probability of the label ``y``; ``margin`` is ``p_true``
    minus the largest probability of any other class, so ``margin > 0`` exactly when
    the sample is classified correctly (used for forgetting events and margin scores).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, num_classes >= 2); got {tuple(logits.shape)}")
    if y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"y must have shape (B,) with B = {logits.shape[0]}; got {tuple(y.shape)}")
    probs = F.softmax(logits.float(), dim=1)
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    others = probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), float("-inf"))
    return p_true, p_true - others.amax(dim=1)
