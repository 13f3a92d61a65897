"""FAB-T: the targeted Fast Adaptive Boundary attack (minimal adversarial perturbations).

Croce & Hein, *Minimally distorted adversarial examples with a fast adaptive boundary
attack* (ICML 2020, arXiv 1907.02044). For each target class t (the ``n_target_classes``
most likely other classes at the clean input), FAB linearises the decision function
``f = z_t - z_y`` at the current iterate and projects onto its zero set intersected with
the image box, from the iterate and from the original input; the step mixes the two
(weight ``alpha = min(|d_iterate| / (|d_iterate| + |d_original|), alpha_max)``), with an
overshoot ``eta``. Whenever the iterate is adversarial it is recorded if it is the
closest found so far and pulled back towards the input by ``beta``. A sample counts as
broken when a target's search found a misclassified point within the eps-ball.

Threat models L-inf and L2 (the minimal-norm projection onto a hyperplane within the
box is found exactly by sorting where coordinates hit the box, see
:func:`project_on_hyperplane`).
Batched; seeded (restarts after the first start at random points at half the distance
found so far); the model's mode and parameter gradients are never touched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rayprune.robust.attacks import NORMS, check_inputs
from rayprune.robust.modes import temporary_mode

_TINY = 1e-12


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project_on_hyperplane(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor, norm: str) -> torch.Tensor:
    """Per row, the smallest ``d`` (in ``norm``) with ``w . d = c`` and ``0 <= p + d <= 1``.

    ``p``, ``w``: (B, D); ``c``: (B,). With ``v = sign(c) w``, the solution moves every
    coordinate toward the hyperplane until its box bound: for L2 ``d = clip(s v, -p, 1-p)``,
    for L-inf ``d = clip(s sign(v), -p, 1-p)``, for the smallest ``s >= 0`` that reaches
    ``|c|``. ``v . d(s)`` is piecewise linear in ``s`` with a kink where a coordinate hits
    its bound, so sorting the kinks gives ``s`` exactly. A ``c`` the box cannot reach gets
    the largest move toward it.
    """
    lo, hi = -p, 1.0 - p
    v = torch.where(c >= 0, 1.0, -1.0)[:, None] * w
    bound = torch.where(v > 0, hi, lo)  # where each coordinate stops, in the direction it moves
    if norm == "l2":
        rate, kink = v * v, torch.where(v != 0, bound / torch.where(v != 0, v, 1.0), 0.0)
    else:
        rate, kink = v.abs(), torch.where(v != 0, bound.abs(), 0.0)
    kinks, order = kink.sort(dim=1)
    rates = rate.gather(1, order)
    below = torch.cumsum(rates * kinks, dim=1) - rates * kinks  # reached by coordinates already at their bound
    moving = rates.flip(1).cumsum(dim=1).flip(1)  # rate of the coordinates still moving
    reached = below + kinks * moving  # v . d at each kink
    target = c.abs()[:, None]
    j = (reached < target).sum(dim=1, keepdim=True)
    inside = j < kinks.shape[1]
    jj = j.clamp(max=kinks.shape[1] - 1)
    s = (target - below.gather(1, jj)) / moving.gather(1, jj).clamp_min(_TINY)
    s = torch.where(inside, s, kinks[:, -1:]).clamp_min(0.0)
    step = s * v if norm == "l2" else s * torch.sign(v)
    return torch.minimum(torch.maximum(step, lo), hi)


def _target_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
    """``z_t - z_y`` per sample and its gradient with respect to ``x``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x).float()
        gap = logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(gap.sum(), x)
    return gap.detach(), grad.detach()


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def fab_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial inputs for pixel inputs ``x`` in [0, 1]: for every sample broken within
    ``eps``, the smallest misclassified point found; for the others, ``x`` itself."""
    check_inputs(x, y)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")
    for name, value in (("steps", steps), ("n_target_classes", n_target_classes), ("restarts", restarts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    x = x.detach()
    out = x.clone()
    with temporary_mode(model, "current"):
        with torch.no_grad():
            logits = model(x).float()
        n_classes = logits.shape[1]
        robust = logits.argmax(dim=1) == y
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        for rank in range(min(n_target_classes, n_classes - 1)):
            for restart in range(restarts):
                todo = robust.nonzero().squeeze(1)
                if todo.numel() == 0:
                    return out
                best, dist = _fab_run(model, x[todo], y[todo], ranked[todo, rank], norm, eps, steps,
                                      alpha_max, eta, beta, random_start=restart > 0, generator=generator)
                broken = dist <= eps
                out[todo[broken]] = best[broken]
                robust[todo[broken]] = False
    return out


def _fab_run(model, x0, y, target, norm, eps, steps, alpha_max, eta, beta, random_start, generator):
    """One FAB run towards ``target``: (the closest adversarial point found, its distance;
    inf where none was found)."""
    n = x0.shape[0]
    flat0 = x0.flatten(1)
    best = x0.clone()
    dist = torch.full((n,), float("inf"), device=x0.device)
    x1 = x0.clone()
    if random_start:
        device = generator.device if generator is not None else x0.device
        if norm == "linf":
            noise = (torch.rand(x0.shape, generator=generator, device=device) * 2 - 1).to(x0)
            noise = noise / noise.flatten(1).abs().amax(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)
        else:
            noise = torch.randn(x0.shape, generator=generator, device=device).to(x0)
            noise = noise / noise.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)
        x1 = (x0 + noise * 0.5 * eps).clamp(0.0, 1.0)
    for _ in range(steps):
        gap, grad = _target_gap(model, x1, y, target)
        w = grad.flatten(1)
        flat1 = x1.flatten(1)
        # The linearised boundary: gap + w . (z - x1) = 0, reached from x1 and from x0.
        d1 = project_on_hyperplane(flat1, w, -gap, norm)
        d2 = project_on_hyperplane(flat0, w, (w * (flat1 - flat0)).sum(dim=1) - gap, norm)
        a1, a2 = _norm(d1, norm).clamp_min(1e-8), _norm(d2, norm).clamp_min(1e-8)
        alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max)[:, None]
        step = ((flat1 + eta * d1) * (1 - alpha) + (flat0 + eta * d2) * alpha).clamp(0.0, 1.0)
        x1 = step.view_as(x0)
        adversarial = _predict(model, x1) != y
        if adversarial.any():
            d = _norm(x1 - x0, norm)
            closer = adversarial & (d < dist)
            best[closer] = x1[closer]
            dist[closer] = d[closer]
            x1[adversarial] = x0[adversarial] + (x1[adversarial] - x0[adversarial]) * beta
    return best, dist
