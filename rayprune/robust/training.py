"""Training-loop building blocks: optimiser, learning-rate schedule, augmentation.

Plain PyTorch, shared by the single-process demo and the Ray Train workers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rayprune.choices import SCHEDULES
from rayprune.validation import check_choice


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True
) -> torch.optim.SGD:
    """SGD with weight decay on weights only: not on biases or normalisation parameters.

    Decaying BatchNorm scales and biases hurts robust accuracy (the paper's recipe);
    every 1-D parameter is one of those.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str = "cosine",
                  warmup_steps: int = 0) -> float:
    """Learning rate at optimiser ``step`` (0-based) of ``total_steps``.

    ``cosine``: linear warm-up then cosine decay to 0. ``one_cycle``: linear ramp up over
    the first 30% (or ``warmup_steps`` if given), then cosine down. ``constant``.
    """
    check_choice(schedule, "schedule", SCHEDULES)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    if schedule == "constant":
        return base_lr
    if schedule == "one_cycle" and warmup_steps == 0:
        warmup_steps = max(1, int(0.3 * total_steps))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def augment(images: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None):
    """Random crop with zero padding and random horizontal flip, for a (B, C, H, W) batch.

    Batched (one gather, no per-sample Python loop); returns a new tensor.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)  # (B, H)
        cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)  # (B, W)
        out = padded[torch.arange(b, device=images.device)[:, None, None, None],
                     torch.arange(images.shape[1], device=images.device)[None, :, None, None],
                     rows[:, None, :, None],
                     cols[:, None, None, :]]
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def to_float_images(images_uint8) -> torch.Tensor:
    """uint8 (B, H, W, C) array or tensor -> float32 (B, C, H, W) in [0, 1]."""
    if isinstance(images_uint8, np.ndarray) and not images_uint8.flags.writeable:
        images_uint8 = images_uint8.copy()  # Ray Data hands out read-only zero-copy arrays
    t = torch.as_tensor(images_uint8)
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"images must be uint8 (B, H, W, C); got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
