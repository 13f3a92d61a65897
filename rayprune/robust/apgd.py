"""Auto-PGD (APGD) and APGD-T in [0, 1] pixel space, after Croce & Hein (2020).

Written from Algorithm 1 and Section 3 of "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020):

* the first step is plain projected gradient ascent of size ``eta = 2 * eps``; every later
  step is a projected step ``z`` followed by a momentum combination
  ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``, ``alpha = 0.75``;
* at the checkpoints ``w_j = ceil(p_j * steps)`` (``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) a sample's step size is halved, and
  its iterate reset to its best point so far, when (1) fewer than ``rho * (w_j - w_{j-1})``
  of its steps since the previous checkpoint increased the loss, or (2) its step size was
  not halved at the previous checkpoint and its best loss has not improved since then;
* losses: cross-entropy, the Difference of Logits Ratio (DLR) and its targeted variant.

Everything is per sample and batched. A sample stops being attacked as soon as some
iterate is misclassified (that iterate is returned for it); for the others the
highest-loss point found is returned. The clean input counts as a candidate: a sample
misclassified at ``x`` is returned unchanged.

Index convention (a deliberate reading of Algorithm 1): the checkpoint test for ``w_j``
runs once ``x^(w_j)`` and its loss are known, i.e. before the step from ``x^(w_j)``, and
counts the successful steps ``x^(i) -> x^(i+1)`` for ``i`` in ``[w_{j-1}, w_j - 1]``
exactly as in the paper's condition 1. A reset therefore replaces ``x^(w_j)`` (and the
previous iterate, so the restart carries no momentum) with the best point, instead of
computing ``x^(w_j + 1)`` first and then discarding it.

Like :func:`rayprune.robust.attacks.pgd_attack`, the attacks differentiate only with
respect to the input (``torch.autograd.grad``): they never touch parameter ``.grad``
fields and never change the model's train/eval mode. Call them with the model in eval
mode: in train mode BatchNorm mixes samples of a batch (so the per-sample bookkeeping
is no longer independent) and updates its running statistics.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rayprune.robust.attacks import (
    NORMS,
    AttackConfig,
    Norm,
    check_inputs,
    project,
    random_start,
)

ApgdLoss = Literal["ce", "dlr", "dlr_targeted"]
APGD_LOSSES: tuple[str, ...] = ("ce", "dlr", "dlr_targeted")

#: Momentum weight alpha of Algorithm 1.
MOMENTUM = 0.75
#: Denominator guard of the DLR losses (as in the paper's definition).
DLR_EPS = 1e-12
# Guards the division by the gradient norm in L2 steps (zero gradient -> no move).
_TINY = 1e-12


# --------------------------------------------------------------------------- losses


def _check_logits(logits: torch.Tensor, y: torch.Tensor, min_classes: int, what: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < min_classes:
        raise ValueError(
            f"{what} needs logits of shape (B, num_classes >= {min_classes}); got {tuple(logits.shape)}"
        )
    if y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"y must have shape (B,) with B = {logits.shape[0]}; got {tuple(y.shape)}")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR, shape ``(B,)``: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``.

    ``pi`` orders the logits decreasingly. Needs at least 3 classes. The loss is positive
    exactly when the sample is misclassified and is invariant to shifting and (positive)
    scaling of the logits.
    """
    _check_logits(logits, y, 3, "DLR loss")
    logits = logits.float()
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -(true - other) / (top[:, 0] - top[:, 2] + DLR_EPS)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, shape ``(B,)``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``.

    ``target`` holds one class per sample. The paper's loss needs 4 classes. With 3 there
    is no ``z_pi4``, and the obvious substitute ``z_pi1 - z_pi3`` fails: when the target is
    the lowest class the ratio is the constant -1 and has no gradient. So with 3 classes
    this returns the un-normalised targeted margin ``-(z_y - z_t)`` (an extension of ours;
    APGD only compares a sample's loss with its own earlier values, so the missing scale
    normalisation does not change its decisions). Needs >= 3 classes.
    """
    _check_logits(logits, y, 3, "targeted DLR loss")
    if target.shape != y.shape:
        raise ValueError(f"target must have shape {tuple(y.shape)}; got {tuple(target.shape)}")
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    if logits.shape[1] == 3:
        return -(true - tgt)
    top = logits.topk(4, dim=1).values
    return -(true - tgt) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_EPS)


def apgd_objective(
    logits: torch.Tensor, y: torch.Tensor, loss: ApgdLoss, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample quantity APGD maximises, shape ``(B,)``."""
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    if loss == "dlr_targeted":
        if target is None:
            raise ValueError("target is required for loss 'dlr_targeted'")
        return dlr_targeted_loss(logits, y, target)
    raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(APGD_LOSSES)}")


# ----------------------------------------------------------------------- schedule


def apgd_checkpoints(steps: int) -> list[int]:
    """Checkpoint iterations ``w_j = ceil(p_j * steps)`` (sorted, duplicates removed).

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` while
    ``p_j <= 1``. The ``p_j`` are kept in exact hundredths so ``ceil`` never sees a
    rounding error (``0.57 * 100`` is not exactly 57 in floating point). For 100 steps:
    ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    hundredths = [0, 22]
    while True:
        nxt = hundredths[-1] + max(hundredths[-1] - hundredths[-2] - 3, 6)
        if nxt > 100:
            break
        hundredths.append(nxt)
    return sorted({-(-p * steps // 100) for p in hundredths})


# ------------------------------------------------------------------------- attack


def _validate(norm: str, eps: float, steps: int, rho: float, restarts: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1]; got {rho!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1; got {restarts!r}")


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)


def _evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: ApgdLoss,
    target: torch.Tensor | None,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-sample loss, its input gradient (if asked) and the predicted class at ``x``."""
    if not need_grad:
        with torch.no_grad():
            logits = model(x)
            return apgd_objective(logits, y, loss, target), None, logits.argmax(dim=1)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        objective = apgd_objective(logits, y, loss, target)
        (grad,) = torch.autograd.grad(objective.sum(), x)
    return objective.detach(), grad.detach(), logits.detach().argmax(dim=1)


def _apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    ball: AttackConfig,
    steps: int,
    loss: ApgdLoss,
    rho: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start: ``(points, losses, fooled)`` per sample.

    ``points`` is the first misclassified iterate where ``fooled`` is True, otherwise
    the best-loss iterate (whose loss is in ``losses``; ``losses`` is meaningless where
    ``fooled``). Fooled samples leave the working set immediately.
    """
    n = x.shape[0]
    checks = set(apgd_checkpoints(steps)[1:])
    out_x = torch.empty_like(x)
    out_loss = torch.full((n,), float("-inf"), device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)

    x_cur = random_start(x, ball, generator)
    f_cur, g_cur, pred = _evaluate(model, x_cur, y, loss, target, need_grad=True)
    assert g_cur is not None
    # Working set: positions into the batch, and the per-sample state restricted to it.
    act = torch.arange(n, device=x.device)
    xs, ys, ts = x, y, target
    x_prev = x_cur
    x_best, f_best, g_best = x_cur.clone(), f_cur.clone(), g_cur.clone()
    eta = torch.full((n,), 2.0 * ball.eps, device=x.device, dtype=x.dtype)
    successes = torch.zeros(n, dtype=torch.long, device=x.device)
    f_best_at_check = f_best.clone()
    halved_last = torch.zeros(n, dtype=torch.bool, device=x.device)
    last_check = 0

    def retire(hit: torch.Tensor, points: torch.Tensor) -> None:
        out_x[act[hit]] = points[hit]
        fooled[act[hit]] = True

    hit = pred != ys
    for k in range(steps):
        if hit.any():
            retire(hit, x_cur)
            keep = ~hit
            act, xs, ys = act[keep], xs[keep], ys[keep]
            ts = ts[keep] if ts is not None else None
            x_cur, x_prev, g_cur, f_cur = x_cur[keep], x_prev[keep], g_cur[keep], f_cur[keep]
            x_best, f_best, g_best = x_best[keep], f_best[keep], g_best[keep]
            eta, successes = eta[keep], successes[keep]
            f_best_at_check, halved_last = f_best_at_check[keep], halved_last[keep]
        if act.numel() == 0:
            break

        if k in checks:
            too_few_successes = successes < rho * (k - last_check)
            stalled = ~halved_last & (f_best <= f_best_at_check)
            halve = too_few_successes | stalled
            eta = torch.where(halve, eta / 2, eta)
            m = halve.view(-1, 1, 1, 1)
            x_cur = torch.where(m, x_best, x_cur)
            x_prev = torch.where(m, x_best, x_prev)
            g_cur = torch.where(m, g_best, g_cur)
            f_cur = torch.where(halve, f_best, f_cur)
            halved_last = halve
            successes = torch.zeros_like(successes)
            f_best_at_check = f_best.clone()
            last_check = k

        step = eta.view(-1, 1, 1, 1) * _direction(g_cur, ball.norm)
        z = project(x_cur + step, xs, ball)
        if k == 0:
            x_new = z
        else:
            x_new = project(
                x_cur + MOMENTUM * (z - x_cur) + (1 - MOMENTUM) * (x_cur - x_prev), xs, ball
            )
        f_new, g_new, pred = _evaluate(model, x_new, ys, loss, ts, need_grad=k + 1 < steps)
        if g_new is None:  # last iterate: only its loss and prediction matter
            g_new = g_cur
        successes = successes + (f_new > f_cur).long()
        better = f_new > f_best
        mb = better.view(-1, 1, 1, 1)
        x_best = torch.where(mb, x_new, x_best)
        g_best = torch.where(mb, g_new, g_best)
        f_best = torch.where(better, f_new, f_best)
        x_prev, x_cur, g_cur, f_cur = x_cur, x_new, g_new, f_new
        hit = pred != ys
    else:
        if hit.any():
            retire(hit, x_cur)
            keep = ~hit
            act, x_best, f_best = act[keep], x_best[keep], f_best[keep]

    out_x[act] = x_best
    out_loss[act] = f_best
    return out_x, out_loss, fooled


def _apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    loss: ApgdLoss,
    rho: float,
    restarts: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restarted APGD on every sample: ``(points, fooled)``; inputs already validated."""
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    fooled = pred != y
    x_out = x.clone()
    if eps == 0 or bool(fooled.all()):
        return x_out, fooled
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    ball = AttackConfig(norm, float(eps), 0.0, 0)  # threat model for start and projection
    for _ in range(restarts):
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        t = target[idx] if target is not None else None
        points, losses, hit = _apgd_run(model, x[idx], y[idx], t, ball, steps, loss, rho, generator)
        improved = hit | (losses > best_loss[idx])
        x_out[idx[improved]] = points[improved]
        best_loss[idx[improved]] = losses[improved]
        fooled[idx[hit]] = True
    return x_out, fooled


def apgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: Norm = "linf",
    eps: float,
    steps: int = 100,
    loss: ApgdLoss = "ce",
    target: torch.Tensor | None = None,
    rho: float = 0.75,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return detached APGD adversarial inputs for pixel inputs ``x`` in [0, 1].

    ``norm``/``eps`` define the threat model (L-inf or L2 ball, intersected with the
    [0, 1] box); ``steps`` is the iteration budget per restart; ``loss`` is "ce", "dlr"
    (needs >= 3 classes) or "dlr_targeted" (needs >= 3 classes, see
    :func:`dlr_targeted_loss`, and ``target``, one class per sample). Each restart
    begins at a uniform random point of the ball (drawn with ``generator``) and only
    attacks samples not yet misclassified.

    Per sample the result is a misclassified point if one was found (the clean ``x``
    if it is already misclassified), else the highest-loss point over all restarts.
    Every result lies in the eps-ball around ``x`` and in [0, 1]. ``eps == 0`` returns a
    copy of ``x``. The model's mode and parameter gradients are left untouched; call
    with the model in eval mode (see the module docstring).
    """
    check_inputs(x, y)
    _validate(norm, eps, steps, rho, restarts)
    if loss not in APGD_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(APGD_LOSSES)}")
    if loss == "dlr_targeted":
        if target is None:
            raise ValueError("target is required for loss 'dlr_targeted'")
        if target.shape != y.shape or target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer classes of shape {tuple(y.shape)}; got "
                             f"{tuple(target.shape)} {target.dtype}")
        target = target.to(y.device)
    elif target is not None:
        raise ValueError(f"target is only used with loss 'dlr_targeted'; got loss {loss!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("apgd_attack needs autograd; call it outside torch.inference_mode()")
    x_adv, _ = _apgd(model, x.detach(), y, target, norm=norm, eps=eps, steps=steps, loss=loss,
                     rho=rho, restarts=restarts, generator=generator)
    return x_adv


def _true_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i``: positive exactly when correctly classified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return true - other


def apgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: Norm = "linf",
    eps: float,
    steps: int = 100,
    n_target_classes: int = 9,
    rho: float = 0.75,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD-T: targeted-DLR APGD against each of the top ``n_target_classes`` other classes.

    Targets are ranked by the clean logits (highest non-true class first); for each rank,
    APGD with the targeted DLR loss runs (``restarts`` times) on the samples not yet
    misclassified. ``n_target_classes`` is capped at ``num_classes - 1``; the model needs
    at least 3 classes (with 3, see :func:`dlr_targeted_loss`). Per sample the result is
    a misclassified point if one was found, else, as targeted losses for different
    targets are not comparable, the point with
    the smallest true-class logit margin ``z_y - max_{i != y} z_i`` among the runs' best
    points (the clean ``x`` included). Same invariants as :func:`apgd_attack`.
    """
    check_inputs(x, y)
    _validate(norm, eps, steps, rho, restarts)
    if (isinstance(n_target_classes, bool) or not isinstance(n_target_classes, int)
            or n_target_classes < 1):
        raise ValueError(f"n_target_classes must be an int >= 1; got {n_target_classes!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("apgd_targeted needs autograd; call it outside torch.inference_mode()")
    x = x.detach()
    with torch.no_grad():
        logits = model(x)
    _check_logits(logits, y, 3, "APGD-T (targeted DLR loss)")
    x_out = x.clone()
    margin = _true_margin(logits, y)
    fooled = logits.argmax(dim=1) != y
    if eps == 0:
        return x_out
    ranked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).argsort(
        dim=1, descending=True
    )
    for rank in range(min(n_target_classes, logits.shape[1] - 1)):
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        points, hit = _apgd(model, x[idx], y[idx], ranked[idx, rank], norm=norm, eps=eps,
                            steps=steps, loss="dlr_targeted", rho=rho, restarts=restarts,
                            generator=generator)
        with torch.no_grad():
            m = _true_margin(model(points), y[idx])
        take = hit | (m < margin[idx])
        x_out[idx[take]] = points[take]
        margin[idx[take]] = m[take]
        fooled[idx[hit]] = True
    return x_out
