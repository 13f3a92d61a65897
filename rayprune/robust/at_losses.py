"""Adversarial-training objectives: Madry PGD-AT and TRADES.

Both craft adversarial inputs with the model temporarily in ``attack_mode`` (eval by
default, so BatchNorm running statistics are not polluted by attack iterates) and
compute the training loss in the model's original mode.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from rayprune.robust.attacks import AttackConfig, pgd_attack
from rayprune.robust.modes import ModelMode, check_mode, temporary_mode


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.detach().argmax(dim=1) == y).float().mean().item()


def pgd_at_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    *,
    attack_mode: ModelMode = "eval",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Madry et al. PGD-AT: mean cross-entropy on PGD-CE adversarial inputs.

    The attack always maximises cross-entropy (``attack.loss`` is replaced by "ce").
    Returns the differentiable loss and detached stats ``{"loss", "adv_acc"}``.
    """
    check_mode(attack_mode, "attack_mode")
    config = dataclasses.replace(attack, loss="ce")
    with temporary_mode(model, attack_mode, "attack_mode"):
        x_adv = pgd_attack(model, x, y, config, generator=generator)
    adv_logits = model(x_adv)
    loss = F.cross_entropy(adv_logits, y)
    return loss, {"loss": loss.item(), "adv_acc": _accuracy(adv_logits, y)}


def trades_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    *,
    beta: float = 6.0,
    label_smoothing: float = 0.0,
    attack_mode: ModelMode = "eval",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``.

    The natural term uses ``label_smoothing`` (the pruning paper uses 0.1 with beta 5);
    the robust term is ``kl_div(log_softmax(f(x_adv)), softmax(f(x)), "batchmean")``
    with gradients through both arguments, as in the reference implementation. The
    adversarial input always maximises the KL term (``attack.loss`` is replaced by
    "kl"), starting from the clean prediction computed in ``attack_mode``.
    Stats: ``loss``, ``natural``, ``robust``, ``clean_acc``, ``adv_acc``.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
        0.0 <= label_smoothing < 1.0
    ):
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    check_mode(attack_mode, "attack_mode")
    config = dataclasses.replace(attack, loss="kl")
    with temporary_mode(model, attack_mode, "attack_mode"):
        x_adv = pgd_attack(model, x, y, config, generator=generator)
    nat_logits = model(x)
    adv_logits = model(x_adv)
    natural = F.cross_entropy(nat_logits, y, label_smoothing=label_smoothing)
    robust = F.kl_div(
        F.log_softmax(adv_logits, dim=1), F.softmax(nat_logits, dim=1), reduction="batchmean"
    )
    loss = natural + beta * robust
    stats = {
        "loss": loss.item(),
        "natural": natural.item(),
        "robust": robust.item(),
        "clean_acc": _accuracy(nat_logits, y),
        "adv_acc": _accuracy(adv_logits, y),
    }
    return loss, stats
