"""Numeric precision of training: fp32, or mixed precision with bf16 or fp16 autocast.

Mixed precision applies to the training step, the attack that makes its adversarial
examples included (the attack's perturbation, projection and clamping stay in fp32:
autocast only lowers matmuls and convolutions). Evaluation and the recording passes use
:func:`full_precision`, which turns autocast off even inside a caller's autocast block:
an attack computed in low precision is weaker and would overstate robust accuracy.
"""

from __future__ import annotations

import contextlib

import torch

from rayprune.choices import PRECISIONS
from rayprune.validation import check_choice

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device`` ("fp32": no autocast)."""
    check_choice(precision, "precision", PRECISIONS)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """fp32 inside, whatever autocast the caller has turned on."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its gradients underflow without one); None otherwise."""
    check_choice(precision, "precision", PRECISIONS)
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
