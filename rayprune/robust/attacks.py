"""Batched PGD in [0, 1] pixel space (L-inf and L2; CE, TRADES-KL and CW-margin losses).

The attack only differentiates with respect to the adversarial input: it never touches
parameter ``.grad`` fields and never changes the model's train/eval mode. Callers choose
the mode (e.g. eval for recording passes, see ``at_losses`` for training).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rayprune.choices import NORMS

Norm = Literal["linf", "l2"]
AttackLoss = Literal["ce", "kl", "cw"]

ATTACK_LOSSES: tuple[str, ...] = ("ce", "kl", "cw")

# Guards the division by the gradient norm in L2 steps (zero gradient -> no move).
_TINY = 1e-12


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """PGD settings: threat model (``norm``, ``eps``), ``steps`` of ``step_size``, and loss.

    ``loss``: "ce" (cross-entropy with the label), "kl" (KL from the clean prediction,
    the TRADES inner maximisation) or "cw" (margin ``max_{j != y} z_j - z_y``).
    """

    norm: Norm
    eps: float
    step_size: float
    steps: int
    loss: AttackLoss = "ce"
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; allowed: {', '.join(NORMS)}")
        if self.loss not in ATTACK_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; allowed: {', '.join(ATTACK_LOSSES)}")
        if not _is_finite_number(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0; got {self.eps!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0; got {self.steps!r}")
        if not _is_finite_number(self.step_size) or self.step_size < 0:
            raise ValueError(f"step_size must be a finite number >= 0; got {self.step_size!r}")
        if self.steps > 0 and self.step_size <= 0:
            raise ValueError(f"step_size must be > 0 when steps > 0; got {self.step_size!r}")
        if not isinstance(self.random_start, bool):
            raise ValueError(f"random_start must be a bool; got {self.random_start!r}")

    @classmethod
    def linf_8_255(
        cls, steps: int = 10, loss: AttackLoss = "ce", random_start: bool = True
    ) -> AttackConfig:
        """L-inf eps 8/255, step 2/255 (Madry et al.; the paper's CIFAR-10 setting)."""
        return cls("linf", 8 / 255, 2 / 255, steps, loss, random_start)

    @classmethod
    def l2_128_255(
        cls, steps: int = 10, loss: AttackLoss = "ce", random_start: bool = True
    ) -> AttackConfig:
        """L2 eps 128/255, step 15/255 (Rice et al. 2020's CIFAR-10 L2 setting)."""
        return cls("l2", 128 / 255, 15 / 255, steps, loss, random_start)


linf_8_255 = AttackConfig.linf_8_255
l2_128_255 = AttackConfig.l2_128_255


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must have shape (B,) with B = x.shape[0] = {x.shape[0]}; got {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels; got dtype {y.dtype}")


def _rand(
    shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None, normal: bool
) -> torch.Tensor:
    """Uniform [0, 1) or standard normal noise drawn on the generator's device, moved to ``like``."""
    device = generator.device if generator is not None else like.device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def random_start(
    x: torch.Tensor, config: AttackConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """A point drawn uniformly from the eps-ball around ``x``, clamped to [0, 1]."""
    if config.norm == "linf":
        delta = (2 * _rand(x.shape, x, generator, normal=False) - 1) * config.eps
    else:
        direction = _rand(x.shape, x, generator, normal=True)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)
        dim = x[0].numel()
        radius = config.eps * _rand(torch.Size([x.shape[0]]), x, generator, normal=False) ** (1.0 / dim)
        delta = direction * radius.view(-1, 1, 1, 1)
    return (x + delta).clamp(0.0, 1.0)


def project(x_adv: torch.Tensor, x: torch.Tensor, config: AttackConfig) -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` and then onto the [0, 1] box."""
    if config.norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - config.eps), x + config.eps)
    else:
        delta = x_adv - x
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        factor = torch.clamp(config.eps / norms.clamp_min(_TINY), max=1.0)
        x_adv = x + delta * factor
    # Clamping moves each coordinate of delta toward zero, so the norm cannot grow.
    return x_adv.clamp(0.0, 1.0)


def attack_objective(
    logits: torch.Tensor,
    y: torch.Tensor,
    loss: AttackLoss,
    clean_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample quantity PGD maximises, shape ``(B,)``."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "kl":
        if clean_probs is None:
            raise ValueError("clean_probs is required for loss 'kl'")
        return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="none").sum(dim=1)
    if loss == "cw":
        true_logit = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        return other.amax(dim=1) - true_logit
    raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(ATTACK_LOSSES)}")


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AttackConfig,
    *,
    clean_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return detached adversarial inputs (the last PGD iterate) for pixel inputs ``x`` in [0, 1].

    Each step moves along the sign of the gradient (L-inf) or the per-sample unit
    gradient (L2), then projects onto the eps-ball and the [0, 1] box. With
    ``random_start`` the first iterate is uniform in the ball (drawn with ``generator``).
    For loss "kl", ``clean_probs`` (softmax of the clean logits) may be given; otherwise
    they are computed once under ``no_grad`` in the model's current mode. Note that the
    KL gradient vanishes at ``x`` itself, so "kl" needs ``random_start=True`` to move.

    The model's mode is left as it is: in train mode, BatchNorm uses batch statistics
    and updates its running averages during the attack. ``eps == 0`` returns a copy of
    ``x``; ``steps == 0`` returns the (random) start point.
    """
    check_inputs(x, y)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("pgd_attack needs autograd; call it outside torch.inference_mode()")
    x = x.detach()
    if config.eps == 0:
        return x.clone()
    x_adv = random_start(x, config, generator) if config.random_start else x.clone()
    if config.steps == 0:
        return x_adv
    if config.loss == "kl":
        if clean_probs is None:
            with torch.no_grad():
                clean_probs = F.softmax(model(x), dim=1)
        elif clean_probs.dim() != 2 or clean_probs.shape[0] != x.shape[0]:
            raise ValueError(
                f"clean_probs must have shape (B, num_classes) with B = {x.shape[0]}; "
                f"got {tuple(clean_probs.shape)}"
            )
        clean_probs = clean_probs.detach()

    for _ in range(config.steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            objective = attack_objective(model(x_adv), y, config.loss, clean_probs).sum()
            (grad,) = torch.autograd.grad(objective, x_adv)
        with torch.no_grad():
            if config.norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)
            x_adv = project(x_adv.detach() + config.step_size * step, x, config)
    return x_adv.detach()
