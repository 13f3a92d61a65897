"""Temporarily switch a model's train/eval mode and restore it exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from torch import nn

ModelMode = Literal["eval", "train", "current"]
MODEL_MODES: tuple[str, ...] = ("eval", "train", "current")


def check_mode(mode: str, name: str = "mode") -> None:
    """Raise ValueError (naming the argument ``name``) unless ``mode`` is a known mode."""
    if mode not in MODEL_MODES:
        raise ValueError(f"unknown {name} {mode!r}; allowed: {', '.join(MODEL_MODES)}")


@contextlib.contextmanager
def temporary_mode(model: nn.Module, mode: ModelMode, name: str = "mode") -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` for the block, then restore every submodule's own flag.

    Flags are restored per submodule (a model may deliberately keep, say, frozen
    BatchNorm layers in eval mode while training), also when the block raises.
    "current" leaves the model untouched.
    """
    check_mode(mode, name)
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        yield model
    finally:
        for module, training in saved:
            module.training = training
