"""Square Attack: a score-based black-box attack by random search.

Andriushchenko, Croce, Flammarion, Hein, *Square Attack: a query-efficient black-box
adversarial attack via random search* (ECCV 2020, arXiv 1912.00049). It only reads the
model's logits, never its gradients, so it breaks models whose gradients are masked
(non-differentiable or shattered layers) where PGD and APGD fail; that is why AutoAttack
runs it last.

Threat models L-inf and L2, untargeted, on the margin loss ``z_y - max_{i != y} z_i``
(minimised; a sample is broken once it is <= 0). Per iteration every still-robust
sample proposes one change inside a square window at a random position (drawn per
sample) and keeps it if the loss went down:

* L-inf: the window is set to ``x +- eps`` with one random sign per channel (the
  perturbation lives on the vertices of the eps-ball); start: vertical stripes.
* L2: mass moves between two windows: the first gets a fresh centred pattern (positive
  and negative half with 1/r^2 weights) plus its old content, renormalised so the whole
  perturbation keeps norm ``eps``; the second is cleared. Start: a grid of such patterns.

The window side follows the paper's schedule of ``p`` (the share of pixels changed),
``p_init`` halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a
10,000-iteration run; ``rescale_schedule`` stretches it onto a smaller budget (for reduced
evaluations), without it the iteration numbers are used as they are (AutoAttack's
standard version with 5,000 queries). Batched; seeded by ``generator``; the model's mode
and parameter gradients are never touched (no gradients are computed at all).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rayprune.robust.attacks import NORMS, check_inputs
from rayprune.robust.modes import temporary_mode

_TINY = 1e-12
#: Iterations after which ``p`` halves, for a 10,000-iteration run.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_at(iteration: int, n_queries: int, p_init: float, rescale: bool) -> float:
    """The share of pixels to change at ``iteration`` (0-based)."""
    it = int(iteration / n_queries * 10_000) if rescale else iteration
    halvings = sum(it > step for step in P_SCHEDULE)
    return p_init / 2**halvings


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i`` per sample (<= 0: misclassified)."""
    with torch.no_grad():
        logits = model(x).float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true - other


def _uniform_int(high: torch.Tensor | int, n: int, generator, device) -> torch.Tensor:
    """``n`` integers uniform in ``[0, high]`` (inclusive)."""
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
    return (u.to(device) * (torch.as_tensor(high, device=device) + 1)).floor().long()


def _signs(shape, generator, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return (torch.randint(0, 2, shape, generator=generator, device=device).to(like) * 2 - 1)


def _window_mask(n: int, side: int, h: int, w: int, rows: torch.Tensor, cols: torch.Tensor,
                 device) -> torch.Tensor:
    """(n, 1, h, w) bool: the ``side`` x ``side`` window at (rows, cols) of each sample."""
    r = torch.arange(h, device=device)[None, :]
    c = torch.arange(w, device=device)[None, :]
    in_rows = (r >= rows[:, None]) & (r < rows[:, None] + side)
    in_cols = (c >= cols[:, None]) & (c < cols[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def l2_pattern(side: int, device=None) -> torch.Tensor:
    """The L2 update's window pattern: the top half positive, the bottom half negative, each
    a sum of centred squares with weight 1/r^2 (r = 1, 2, ... from the centre out), unit norm."""

    def rectangle(rows: int, cols: int) -> torch.Tensor:
        out = torch.zeros(rows, cols, device=device)
        centre_r, centre_c = rows // 2, cols // 2
        for r in range(max(centre_r, centre_c) + 1):
            out[max(centre_r - r, 0):min(centre_r + r + 1, rows), max(centre_c - r, 0):min(centre_c + r + 1, cols)] += (
                1.0 / (r + 1) ** 2)
        return out / out.norm().clamp_min(_TINY)

    pattern = torch.cat([rectangle(side // 2, side), -rectangle(side - side // 2, side)]) if side > 1 else (
        torch.ones(1, 1, device=device))
    return pattern / pattern.norm().clamp_min(_TINY)


def _patterns(n: int, side: int, generator, like: torch.Tensor) -> torch.Tensor:
    """(n, 1, side, side) L2 patterns, each transposed with probability 1/2."""
    base = l2_pattern(side, like.device).to(like)
    flip = _uniform_int(1, n, generator, like.device).bool()
    out = base.expand(n, side, side).clone()
    out[flip] = base.T
    return out[:, None]


def square_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 8 / 255,
    n_queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial inputs for pixel inputs ``x`` in [0, 1] (B, C, H, W) with labels ``y``.

    Each sample gets at most ``n_queries`` proposals after the initial point; samples stop
    as soon as they are misclassified. Returns the best point found (inside the eps-ball
    and [0, 1]); for samples never broken, the point of lowest margin.
    """
    check_inputs(x, y)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 0:
        raise ValueError(f"n_queries must be an int >= 0; got {n_queries!r}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1]; got {p_init!r}")
    x = x.detach()
    n, c, h, w = x.shape
    with temporary_mode(model, "current"):
        if norm == "linf":
            return _linf(model, x, y, eps, n_queries, p_init, rescale_schedule, generator, c, h, w)
        return _l2(model, x, y, eps, n_queries, p_init, rescale_schedule, generator, c, h, w)


def _side(p: float, c: int, h: int, w: int, minimum: int) -> int:
    return min(max(int(round(math.sqrt(p * c * h * w / c))), minimum), h, w)


def _keep_better(best: torch.Tensor, best_margin: torch.Tensor, active: torch.Tensor, proposal: torch.Tensor,
                 proposal_margin: torch.Tensor) -> None:
    """Random search's greedy step, in place: each active sample keeps its proposal if it lowers the margin."""
    better = proposal_margin < best_margin[active]
    keep = active[better]
    best[keep] = proposal[better]
    best_margin[keep] = proposal_margin[better]


def _linf(model, x, y, eps, n_queries, p_init, rescale, generator, c, h, w) -> torch.Tensor:
    n = x.shape[0]
    best = (x + eps * _signs((n, c, 1, w), generator, x)).clamp(0.0, 1.0)  # vertical stripes
    best_margin = margin(model, best, y)
    for it in range(n_queries):
        active = (best_margin > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        side = _side(p_at(it, n_queries, p_init, rescale), c, h, w, 1)
        k = active.numel()
        rows = _uniform_int(h - side, k, generator, x.device)
        cols = _uniform_int(w - side, k, generator, x.device)
        window = _window_mask(k, side, h, w, rows, cols, x.device)
        vertex = (x[active] + eps * _signs((k, c, 1, 1), generator, x)).clamp(0.0, 1.0)
        proposal = torch.where(window, vertex, best[active])
        _keep_better(best, best_margin, active, proposal, margin(model, proposal, y[active]))
    return best


def _l2_normalised(delta: torch.Tensor) -> torch.Tensor:
    return delta / delta.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)


def _l2(model, x, y, eps, n_queries, p_init, rescale, generator, c, h, w) -> torch.Tensor:
    n = x.shape[0]
    side = max(h // 5, 1)
    start = (h - side * 5) // 2 if h >= 5 else 0
    delta = torch.zeros_like(x)
    for i in range(h // side):  # a grid of patterns with random signs per (sample, channel)
        for j in range(w // side):
            r, q = start + i * side, start + j * side
            if r + side > h or q + side > w:
                continue
            delta[:, :, r:r + side, q:q + side] += _patterns(n, side, generator, x) * _signs((n, c, 1, 1), generator, x)
    best = (x + _l2_normalised(delta) * eps).clamp(0.0, 1.0)
    best_margin = margin(model, best, y)
    for it in range(n_queries):
        active = (best_margin > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        side = _side(p_at(it, n_queries, p_init, rescale), c, h, w, 3)
        side += 1 - side % 2  # odd, so the pattern has a centre
        side = min(side, h, w)
        k = active.numel()
        x_a = x[active]
        d = best[active] - x_a
        first = _window_mask(k, side, h, w, _uniform_int(h - side, k, generator, x.device),
                             _uniform_int(w - side, k, generator, x.device), x.device)
        second = _window_mask(k, side, h, w, _uniform_int(h - side, k, generator, x.device),
                              _uniform_int(w - side, k, generator, x.device), x.device)
        total = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        in_windows = (d * (first | second)).square().sum(dim=(2, 3), keepdim=True).sqrt()  # per channel
        old_window = _extract(d, first, side)  # (k, c, side, side)
        old_norm = old_window.square().sum(dim=(2, 3), keepdim=True).sqrt()
        fresh = _patterns(k, side, generator, x) * _signs((k, c, 1, 1), generator, x) + old_window / (
            old_norm + _TINY)
        budget = ((eps ** 2 - total ** 2).clamp_min(0.0) / c + in_windows ** 2).sqrt()
        fresh = fresh / fresh.square().sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(_TINY) * budget
        d = torch.where(second, torch.zeros_like(d), d)
        d = _place(d, first, fresh)
        proposal = (x_a + _l2_normalised(d) * eps).clamp(0.0, 1.0)
        _keep_better(best, best_margin, active, proposal, margin(model, proposal, y[active]))
    return best


def _extract(t: torch.Tensor, window: torch.Tensor, side: int) -> torch.Tensor:
    """The ``side`` x ``side`` window of each sample of ``t`` (k, c, h, w) -> (k, c, side, side)."""
    k, c = t.shape[:2]
    mask = window.expand_as(t)
    return t[mask].view(k, c, side, side)


def _place(t: torch.Tensor, window: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``t`` with each sample's window replaced by ``values`` (k, c, side, side)."""
    out = t.clone()
    out[window.expand_as(t)] = values.reshape(-1)
    return out
