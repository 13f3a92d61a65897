"""Tests for rayprune.robust.attacks and metrics against textbook loops and closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Sampler, fit_small_cnn
from torch import nn

from rayprune.robust.attacks import AttackConfig, attack_objective, l2_128_255, linf_8_255, pgd_attack
from rayprune.robust.metrics import true_class_stats
from rayprune.robust.models import SmallCNN

LINF_EPS = 4 / 255  # the tiny model's adversarial accuracy sits mid-range here
L2_EPS = 0.2


# ------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained_cnn(blob_sampler: Sampler) -> SmallCNN:
    """A SmallCNN trained for a few dozen steps (~95% clean accuracy), in eval mode."""
    return fit_small_cnn(blob_sampler, 1024, 50)


def _model_copy(model: nn.Module) -> nn.Module:
    """Fresh copy, so train-mode attacks cannot change the shared fixture's BN statistics."""
    return copy.deepcopy(model)


# ---------------------------------------------------------------- textbook references


def textbook_pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                      steps: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Madry et al. PGD as commonly written: mean CE, sign step, clip to ball and box."""
    x_adv = x.clone() if start is None else start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def textbook_pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                    steps: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """L2 PGD: unit-gradient step, rescale delta to the eps-sphere if outside, clip to box."""
    b = x.shape[0]
    x_adv = x.clone() if start is None else start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        flat = grad.reshape(b, -1)
        unit = flat / flat.norm(dim=1, keepdim=True)
        x_adv = x_adv.detach() + alpha * unit.reshape(x.shape)
        delta = (x_adv - x).reshape(b, -1)
        n = delta.norm(dim=1, keepdim=True)
        delta = torch.where(n > eps, delta * eps / n, delta)
        x_adv = (x + delta.reshape(x.shape)).clamp(0, 1)
    return x_adv.detach()


def _error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) != y).float().mean().item()


# ------------------------------------------------------------------ textbook equality


def test_linf_matches_textbook_loop(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    x, y = x[:64], y[:64]
    cfg = AttackConfig("linf", LINF_EPS, LINF_EPS / 4, 7, random_start=False)
    ours = pgd_attack(trained_cnn, x, y, cfg)
    ref = textbook_pgd_linf(trained_cnn, x, y, LINF_EPS, LINF_EPS / 4, 7)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert _error_rate(trained_cnn, ours, y) > _error_rate(trained_cnn, x, y) + 0.1


def test_l2_matches_textbook_loop(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    x, y = x[:64], y[:64]
    cfg = AttackConfig("l2", L2_EPS, L2_EPS / 4, 7, random_start=False)
    ours = pgd_attack(trained_cnn, x, y, cfg)
    ref = textbook_pgd_l2(trained_cnn, x, y, L2_EPS, L2_EPS / 4, 7)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert _error_rate(trained_cnn, ours, y) > _error_rate(trained_cnn, x, y) + 0.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_success_at_least_textbook(norm: str, trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    eps = LINF_EPS if norm == "linf" else L2_EPS
    steps, alpha = 5, eps / 3
    g = torch.Generator().manual_seed(11)
    if norm == "linf":
        start = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1)
        ref = textbook_pgd_linf(trained_cnn, x, y, eps, alpha, steps, start)
    else:
        # Uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d).
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=g)
        direction = direction / direction.reshape(len(x), -1).norm(dim=1).view(-1, 1, 1, 1)
        radius = eps * torch.rand(len(x), generator=g) ** (1 / d)
        start = (x + direction * radius.view(-1, 1, 1, 1)).clamp(0, 1)
        ref = textbook_pgd_l2(trained_cnn, x, y, eps, alpha, steps, start)
    cfg = AttackConfig(norm, eps, alpha, steps, random_start=True)
    ours = pgd_attack(trained_cnn, x, y, cfg, generator=torch.Generator().manual_seed(12))
    ref_success = _error_rate(trained_cnn, ref, y)
    assert 0.1 < ref_success < 0.95  # the comparison is informative
    assert _error_rate(trained_cnn, ours, y) >= ref_success - 0.02


# ---------------------------------------------------------------------- closed forms


@pytest.fixture(scope="module")
def binary_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A random 2-class linear model and inputs near 0.5 (the [0, 1] box never binds)."""
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 192, generator=g))
        model[1].bias.copy_(torch.randn(2, generator=g))
    x = 0.5 + 0.05 * (2 * torch.rand(16, 3, 8, 8, generator=g) - 1)
    y = torch.randint(0, 2, (16,), generator=g)
    return model, x, y


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_linf_reaches_linear_optimum(binary_linear: tuple, loss: str) -> None:
    """For z_y - z_other = (w_y - w_o).x + c, the worst L-inf delta is -eps * sign(w_y - w_o)."""
    model, x, y = binary_linear
    eps = 0.03
    w = model[1].weight.detach()
    w_diff = (w[y] - w[1 - y]).reshape(x.shape)
    expected = x - eps * w_diff.sign()
    x_adv = pgd_attack(model, x, y, AttackConfig("linf", eps, eps / 4, 10, loss=loss, random_start=False))
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)
    # Random starts converge to the same corner.
    x_adv_rs = pgd_attack(model, x, y, AttackConfig("linf", eps, eps / 4, 10, loss=loss),
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_adv_rs, expected, atol=1e-6, rtol=0)


def test_l2_reaches_linear_optimum(binary_linear: tuple) -> None:
    """The worst L2 delta for a linear margin is -eps * (w_y - w_o) / ||w_y - w_o||."""
    model, x, y = binary_linear
    eps = 0.1
    w = model[1].weight.detach()
    w_diff = w[y] - w[1 - y]
    expected = x - eps * (w_diff / w_diff.norm(dim=1, keepdim=True)).reshape(x.shape)
    x_adv = pgd_attack(model, x, y, AttackConfig("l2", eps, eps / 4, 10, random_start=False))
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attack_invariants(
    trained_cnn: nn.Module, sample_batch: tuple, norm: str, loss: str, mode: str
) -> None:
    model = _model_copy(trained_cnn).train(mode == "train")
    x, y = sample_batch
    x, y = x[:32], y[:32]
    # Push some pixels to the box edges so clamping is exercised.
    x = x.clone()
    x[:, 0, 0, :] = 0.0
    x[:, 1, 0, :] = 1.0
    x_before = x.clone()
    flags_before = [m.training for m in model.modules()]
    eps = 8 / 255 if norm == "linf" else 0.5
    cfg = AttackConfig(norm, eps, eps / 2, 5, loss=loss)
    x_adv = pgd_attack(model, x, y, cfg, generator=torch.Generator().manual_seed(1))

    assert torch.equal(x, x_before)
    assert [m.training for m in model.modules()] == flags_before
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps + 1e-5).all()
    assert delta.abs().max() > 0


def test_mixed_submodule_modes_are_left_alone(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    model = _model_copy(trained_cnn).train()
    model.body[1].eval()  # e.g. a frozen BatchNorm inside a training model
    flags = [m.training for m in model.modules()]
    x, y = sample_batch
    pgd_attack(model, x[:8], y[:8], linf_8_255(steps=2))
    assert [m.training for m in model.modules()] == flags


def test_attack_works_under_no_grad(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    cfg = AttackConfig("linf", LINF_EPS, LINF_EPS / 4, 3, random_start=False)
    expected = pgd_attack(trained_cnn, x[:16], y[:16], cfg)
    with torch.no_grad():
        got = pgd_attack(trained_cnn, x[:16], y[:16], cfg)
    assert torch.equal(got, expected)


def test_generator_makes_random_start_reproducible(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    cfg = linf_8_255(steps=2)
    a = pgd_attack(trained_cnn, x[:16], y[:16], cfg, generator=torch.Generator().manual_seed(3))
    b = pgd_attack(trained_cnn, x[:16], y[:16], cfg, generator=torch.Generator().manual_seed(3))
    c = pgd_attack(trained_cnn, x[:16], y[:16], cfg, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_inference_mode_is_refused(trained_cnn: nn.Module) -> None:
    x, y = torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pgd_attack(trained_cnn, x, y, linf_8_255(steps=1))


def test_zero_eps_and_zero_steps(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    x, y = x[:8], y[:8]
    out = pgd_attack(trained_cnn, x, y, AttackConfig("linf", 0.0, 0.1, 5))
    assert torch.equal(out, x) and out is not x
    out = pgd_attack(trained_cnn, x, y, AttackConfig("l2", 0.5, 0.0, 0, random_start=False))
    assert torch.equal(out, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_alone_stays_in_box(norm: str) -> None:
    """With steps=0 the random start point itself is returned, clamped to [0, 1]."""
    x = torch.zeros(64, 3, 8, 8)
    x[:, 1] = 1.0
    y = torch.zeros(64, dtype=torch.long)
    eps = 0.1 if norm == "linf" else 1.0
    out = pgd_attack(nn.Flatten(), x, y, AttackConfig(norm, eps, 0.0, 0),
                     generator=torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert (out != x).any()


def test_linf_random_start_is_uniform_in_ball() -> None:
    """steps=0 returns the start point: for a non-binding box, delta ~ U[-eps, eps] per pixel."""
    x = torch.full((400, 3, 8, 8), 0.5)
    y = torch.zeros(400, dtype=torch.long)
    eps = 0.1
    out = pgd_attack(nn.Flatten(), x, y, AttackConfig("linf", eps, 0.0, 0),
                     generator=torch.Generator().manual_seed(0))
    delta = out - x
    assert delta.abs().max() <= eps
    assert abs(delta.mean().item()) < 2e-3
    assert abs(delta.var().item() - eps**2 / 3) < 1e-4  # variance of U[-eps, eps]


def test_l2_random_start_is_uniform_in_ball() -> None:
    """Uniform in a d-ball: P(||delta|| <= r) = (r / eps)^d, so (||delta|| / eps)^d ~ U[0, 1]."""
    n, eps = 2000, 0.2
    x = torch.full((n, 1, 2, 2), 0.5)  # d = 4 keeps the radius law easy to see
    y = torch.zeros(n, dtype=torch.long)
    out = pgd_attack(nn.Flatten(), x, y, AttackConfig("l2", eps, 0.0, 0),
                     generator=torch.Generator().manual_seed(0))
    radii = (out - x).reshape(n, -1).norm(dim=1)
    assert (radii <= eps + 1e-6).all()
    u = (radii / eps) ** 4
    assert abs(u.mean().item() - 0.5) < 0.02
    assert abs((u < 0.25).float().mean().item() - 0.25) < 0.03
    directions = (out - x).reshape(n, -1) / radii[:, None]
    assert directions.mean(dim=0).abs().max() < 0.06


# ------------------------------------------------------------------- loss behaviours


def _cw_margin_by_hand(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    out = []
    for row, label in zip(logits.tolist(), y.tolist()):
        best_other = max(v for j, v in enumerate(row) if j != label)
        out.append(best_other - row[label])
    return out


def test_objectives_match_hand_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    clean = F.softmax(torch.randn(6, 5, generator=g), dim=1)
    cw = attack_objective(logits, y, "cw")
    assert cw.tolist() == pytest.approx(_cw_margin_by_hand(logits, y), abs=1e-6)
    ce = attack_objective(logits, y, "ce")
    ce_hand = [
        math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist(), y.tolist())
    ]
    assert ce.tolist() == pytest.approx(ce_hand, abs=1e-5)
    kl = attack_objective(logits, y, "kl", clean)
    q = F.softmax(logits, dim=1)
    kl_hand = [sum(pi * math.log(pi / qi) for pi, qi in zip(p_row, q_row))
               for p_row, q_row in zip(clean.tolist(), q.tolist())]
    assert kl.tolist() == pytest.approx(kl_hand, abs=1e-5)
    with pytest.raises(ValueError, match="clean_probs"):
        attack_objective(logits, y, "kl")


def test_cw_attack_increases_margin_objective(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    cfg = AttackConfig("linf", LINF_EPS, LINF_EPS / 4, 10, loss="cw", random_start=False)
    x_adv = pgd_attack(trained_cnn, x, y, cfg)
    with torch.no_grad():
        clean = torch.tensor(_cw_margin_by_hand(trained_cnn(x), y))
        adv = torch.tensor(_cw_margin_by_hand(trained_cnn(x_adv), y))
    assert adv.mean() > clean.mean() + 1.0
    assert (adv > clean).float().mean() > 0.95
    assert _error_rate(trained_cnn, x_adv, y) > _error_rate(trained_cnn, x, y) + 0.1


def test_kl_attack_beats_random_perturbation(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    eps = 8 / 255
    with torch.no_grad():
        p = F.softmax(trained_cnn(x), dim=1)

    def kl_from_clean(x_other: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = F.softmax(trained_cnn(x_other), dim=1)
        return (p * (p.log() - q.log())).sum(dim=1)

    g = torch.Generator().manual_seed(7)
    x_rand = (x + eps * (2 * torch.randint(0, 2, x.shape, generator=g) - 1)).clamp(0, 1)
    x_adv = pgd_attack(trained_cnn, x, y, AttackConfig("linf", eps, eps / 4, 10, loss="kl"),
                       generator=torch.Generator().manual_seed(8))
    # Passing the clean probabilities explicitly gives the same attack.
    x_adv2 = pgd_attack(trained_cnn, x, y, AttackConfig("linf", eps, eps / 4, 10, loss="kl"),
                        clean_probs=p, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x_adv, x_adv2)
    assert kl_from_clean(x_adv).mean() > 5 * kl_from_clean(x_rand).mean()


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"norm": "l1"}, "norm"),
        ({"loss": "mse"}, "loss"),
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"random_start": 1}, "random_start"),
    ],
)
def test_attack_config_validation(kwargs: dict, field: str) -> None:
    base = {"norm": "linf", "eps": 0.03, "step_size": 0.01, "steps": 3}
    with pytest.raises(ValueError, match=field):
        AttackConfig(**{**base, **kwargs})


def test_presets() -> None:
    linf = linf_8_255()
    assert (linf.norm, linf.eps, linf.step_size, linf.steps, linf.loss, linf.random_start) == (
        "linf", 8 / 255, 2 / 255, 10, "ce", True)
    assert AttackConfig.linf_8_255(steps=40, loss="cw").steps == 40
    l2 = l2_128_255(steps=5)
    assert (l2.norm, l2.eps, l2.step_size, l2.steps) == ("l2", 128 / 255, 15 / 255, 5)
    assert AttackConfig("linf", 0.0, 0.0, 0).steps == 0  # step_size may be 0 without steps


def test_input_shape_validation(trained_cnn: nn.Module) -> None:
    cfg = linf_8_255(steps=1)
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="x must"):
        pgd_attack(trained_cnn, x[0], torch.zeros(4, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="y must"):
        pgd_attack(trained_cnn, x, torch.zeros(3, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="y must"):
        pgd_attack(trained_cnn, x, torch.zeros(4), cfg)
    with pytest.raises(ValueError, match="clean_probs"):
        pgd_attack(trained_cnn, x, torch.zeros(4, dtype=torch.long), AttackConfig("linf", 0.1, 0.1, 1, "kl"),
                   clean_probs=torch.ones(3, 4) / 4)


# --------------------------------------------------------------------------- metrics


def test_true_class_stats_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 4, generator=g) * 3
    y = torch.randint(0, 4, (7,), generator=g)
    p_true, margin = true_class_stats(logits, y)
    for i, (row, label) in enumerate(zip(logits.tolist(), y.tolist())):
        z = sum(math.exp(v) for v in row)
        probs = [math.exp(v) / z for v in row]
        assert p_true[i].item() == pytest.approx(probs[label], abs=1e-6)
        best_other = max(p for j, p in enumerate(probs) if j != label)
        assert margin[i].item() == pytest.approx(probs[label] - best_other, abs=1e-6)
        assert (margin[i] > 0).item() == (max(range(4), key=lambda j: row[j]) == label)
    with pytest.raises(ValueError, match="y must"):
        true_class_stats(logits, y[:3])
    with pytest.raises(ValueError, match="logits must"):
        true_class_stats(logits[:, :1], y)
