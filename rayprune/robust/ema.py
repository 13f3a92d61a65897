"""Exponential moving average of model weights (evaluated instead of the raw model)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The wrapped module of a (Distributed)DataParallel model, else ``model`` itself."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


class ModelEMA:
    """EMA of a model's parameters; buffers (BatchNorm statistics) are copied, not averaged.

    After ``t`` earlier updates, an update uses decay ``min(decay, (1 + t) / (10 + t))``
    when ``warmup`` is on (so early weights are forgotten quickly), else ``decay``:
    ``ema = d * ema + (1 - d) * param``. ``module`` is the averaged model, kept in eval
    mode with gradients disabled.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, warmup: bool = True) -> None:
        _check_decay(decay)
        self.module: nn.Module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s floating-point parameters in; copy its buffers."""
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        ema_params = dict(self.module.named_parameters())
        ema_buffers = dict(self.module.named_buffers())
        if params.keys() != ema_params.keys() or buffers.keys() != ema_buffers.keys():
            raise ValueError("model must have the same parameter and buffer names as the EMA copy")
        d = self.current_decay()
        for name, ema_p in ema_params.items():
            p = params[name].detach()
            if ema_p.dtype.is_floating_point:
                ema_p.mul_(d).add_(p, alpha=1.0 - d)
            else:
                ema_p.copy_(p)
        for name, ema_b in ema_buffers.items():
            ema_b.copy_(buffers[name].detach())
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights plus decay settings and the update counter."""
        return {
            "module": self.module.state_dict(),
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights, settings and counter, so a resumed run continues identically."""
        missing = {"module", "decay", "warmup", "num_updates"} - state.keys()
        if missing:
            raise ValueError(f"state is missing keys: {', '.join(sorted(missing))}")
        _check_decay(state["decay"])
        self.module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


def _check_decay(decay: float) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (
        math.isfinite(decay) and 0.0 <= decay < 1.0
    ):
        raise ValueError(f"decay must be in [0, 1); got {decay!r}")
