"""Tests for rayprune.robust.apgd against textbook PGD, closed forms and hand computations."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from conftest import Sampler, fit_small_cnn, seeded_generator
from torch import nn

from rayprune.robust.apgd import (
    apgd_attack,
    apgd_checkpoints,
    apgd_objective,
    apgd_targeted,
    dlr_loss,
    dlr_targeted_loss,
)
from rayprune.robust.models import SmallCNN

LINF_EPS = 6 / 255  # the tiny model's PGD accuracy sits mid-range (~40-50%) here
L2_EPS = 0.25

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained_cnn(blob_sampler: Sampler) -> SmallCNN:
    """A width-8 SmallCNN after 100 Adam steps (~97% clean accuracy), in eval mode."""
    return fit_small_cnn(blob_sampler, 2048, 100)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


# ---------------------------------------------------------------- textbook references


def textbook_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float,
                 alpha: float, steps: int, seed: int) -> torch.Tensor:
    """Madry et al. PGD from a random start in the ball: mean CE, sign / unit-L2 step, clip."""
    g = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    if norm == "linf":
        x_adv = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1)
    else:
        d = torch.randn(x.shape, generator=g).reshape(b, -1)
        d = d / d.norm(dim=1, keepdim=True) * eps * torch.rand(b, 1, generator=g)
        x_adv = (x + d.reshape(x.shape)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        if norm == "linf":
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        else:
            flat = grad.reshape(b, -1)
            x_adv = x_adv.detach() + alpha * (flat / flat.norm(dim=1, keepdim=True)).reshape(x.shape)
            delta = (x_adv - x).reshape(b, -1)
            n = delta.norm(dim=1, keepdim=True)
            delta = torch.where(n > eps, delta * eps / n, delta)
            x_adv = (x + delta.reshape(x.shape)).clamp(0, 1)
    return x_adv.detach()


def _assert_in_threat_model(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5


# ------------------------------------------------------------- strength vs textbook PGD


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_at_least_as_strong_as_textbook_pgd(norm: str, trained_cnn: nn.Module,
                                                    sample_batch: tuple) -> None:
    x, y = sample_batch
    eps = LINF_EPS if norm == "linf" else L2_EPS
    pgd_acc = _accuracy(trained_cnn, textbook_pgd(trained_cnn, x, y, norm, eps, eps / 4, 20, seed=5), y)
    x_adv = apgd_attack(trained_cnn, x, y, norm=norm, eps=eps, steps=20, generator=seeded_generator(6))
    _assert_in_threat_model(x_adv, x, norm, eps)
    apgd_acc = _accuracy(trained_cnn, x_adv, y)
    assert 0.15 < pgd_acc < _accuracy(trained_cnn, x, y) - 0.2  # the comparison means something
    assert apgd_acc <= pgd_acc + 0.02


def test_standard_budget_apgd_ce_and_apgd_t(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    """AutoAttack's standard budget (100 iterations) on a small batch."""
    x, y = sample_batch
    x, y = x[:96], y[:96]
    x_pgd = textbook_pgd(trained_cnn, x, y, "linf", LINF_EPS, LINF_EPS / 4, 20, seed=5)
    pgd_acc = _accuracy(trained_cnn, x_pgd, y)
    x_ce = apgd_attack(trained_cnn, x, y, eps=LINF_EPS, steps=100, generator=seeded_generator(1))
    x_t = apgd_targeted(trained_cnn, x, y, eps=LINF_EPS, steps=100, generator=seeded_generator(2))
    for x_adv in (x_ce, x_t):
        _assert_in_threat_model(x_adv, x, "linf", LINF_EPS)
        assert _accuracy(trained_cnn, x_adv, y) <= pgd_acc + 0.02


def test_dlr_and_targeted_reach_textbook_strength(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    x_pgd = textbook_pgd(trained_cnn, x, y, "linf", LINF_EPS, LINF_EPS / 4, 20, seed=5)
    pgd_acc = _accuracy(trained_cnn, x_pgd, y)
    x_dlr = apgd_attack(trained_cnn, x, y, eps=LINF_EPS, steps=20, loss="dlr", generator=seeded_generator(3))
    x_t = apgd_targeted(trained_cnn, x, y, eps=LINF_EPS, steps=20, generator=seeded_generator(4))
    assert _accuracy(trained_cnn, x_dlr, y) <= pgd_acc + 0.03
    assert _accuracy(trained_cnn, x_t, y) <= pgd_acc + 0.02


def test_more_restarts_only_break_more(trained_cnn: nn.Module, sample_batch: tuple) -> None:
    """The first restart of a 3-restart run is the 1-restart run; later restarts only add."""
    x, y = sample_batch
    one = apgd_attack(trained_cnn, x, y, eps=LINF_EPS, steps=10, generator=seeded_generator(9))
    three = apgd_attack(trained_cnn, x, y, eps=LINF_EPS, steps=10, restarts=3, generator=seeded_generator(9))
    with torch.no_grad():
        broken_one = trained_cnn(one).argmax(dim=1) != y
        broken_three = trained_cnn(three).argmax(dim=1) != y
    assert (broken_one & ~broken_three).sum() == 0
    assert torch.equal(one[broken_one], three[broken_one])  # first hit is kept
    again = apgd_attack(trained_cnn, x, y, eps=LINF_EPS, steps=10, generator=seeded_generator(9))
    assert torch.equal(one, again)  # the generator makes runs reproducible


# ----------------------------------------------------------------------- invariants


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("variant", ["ce", "dlr", "dlr_targeted", "apgd_t"])
def test_invariants(norm: str, variant: str, trained_cnn: nn.Module, sample_batch: tuple) -> None:
    x, y = sample_batch
    x, y = x[:48], y[:48]
    eps = LINF_EPS if norm == "linf" else L2_EPS
    x_before = x.clone()
    for training in (False, True):
        model = copy.deepcopy(trained_cnn).train(training)
        if training:
            model.body[1].eval()  # a mixed-mode model must keep every submodule's flag
        flags = [m.training for m in model.modules()]
        if variant == "apgd_t":
            x_adv = apgd_targeted(model, x, y, norm=norm, eps=eps, steps=5, n_target_classes=2,
                                  generator=seeded_generator(0))
        else:
            target = (y + 1) % 4 if variant == "dlr_targeted" else None
            x_adv = apgd_attack(model, x, y, norm=norm, eps=eps, steps=5, loss=variant,
                                target=target, generator=seeded_generator(0))
        assert [m.training for m in model.modules()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert not x_adv.requires_grad and x_adv.shape == x.shape
        _assert_in_threat_model(x_adv, x, norm, eps)
        assert torch.equal(x, x_before)


def test_clean_misclassified_samples_returned_unchanged(trained_cnn: nn.Module,
                                                        sample_batch: tuple) -> None:
    x, y = sample_batch
    wrong = (y + 1) % 4  # labels the model gets wrong at x for almost every sample
    with torch.no_grad():
        miss = trained_cnn(x).argmax(dim=1) != wrong
    assert miss.sum() > 200
    x_adv = apgd_attack(trained_cnn, x, wrong, eps=LINF_EPS, steps=5, generator=seeded_generator(0))
    assert torch.equal(x_adv[miss], x[miss])
    assert torch.equal(apgd_attack(trained_cnn, x, y, eps=0.0, steps=5), x)


# ------------------------------------------------------------------ hand computations


def test_dlr_losses_match_hand_values() -> None:
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0],
                           [0.5, 2.0, 1.0, 3.0, 0.0]])
    y = torch.tensor([0, 2])
    # Row 0: sorted 4, 3, 1, 0, -1; z_y = 4, best other 3 -> -(4 - 3) / (4 - 1) = -1/3.
    # Row 1: sorted 3, 2, 1, 0.5, 0; z_y = 1, best other 3 -> -(1 - 3) / (3 - 1) = 1.
    assert dlr_loss(logits, y).tolist() == pytest.approx([-1 / 3, 1.0], abs=1e-6)
    target = torch.tensor([1, 4])
    # Row 0: -(4 - 1) / (4 - (1 + 0) / 2) = -3 / 3.5.
    # Row 1: -(1 - 0) / (3 - (1 + 0.5) / 2) = -1 / 2.25.
    targeted = dlr_targeted_loss(logits, y, target)
    assert targeted.tolist() == pytest.approx([-3 / 3.5, -1 / 2.25], abs=1e-6)
    assert apgd_objective(logits, y, "dlr").tolist() == pytest.approx([-1 / 3, 1.0], abs=1e-6)
    ce_hand = [math.log(sum(math.exp(v) for v in row)) - row[t]
               for row, t in zip(logits.tolist(), y.tolist())]
    assert apgd_objective(logits, y, "ce").tolist() == pytest.approx(ce_hand, abs=1e-5)
    # Shift and positive-scale invariance of DLR.
    assert dlr_loss(3 * logits + 7, y).tolist() == pytest.approx([-1 / 3, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="num_classes >= 3"):
        dlr_loss(logits[:, :2], y.clamp(max=1))
    # With 3 classes (no z_pi4) the loss is the plain targeted margin -(z_y - z_t):
    # row 0 is [4, 1, 3], y = 0, t = 1 -> -3; row 1 is [0.5, 2, 1], y = 2, t = 0 -> -0.5.
    three = dlr_targeted_loss(logits[:, :3], y, torch.tensor([1, 0]))
    assert three.tolist() == pytest.approx([-3.0, -0.5], abs=1e-6)
    with pytest.raises(ValueError, match="num_classes >= 3"):
        dlr_targeted_loss(logits[:, :2], y.clamp(max=1), target.clamp(max=1))
    with pytest.raises(ValueError, match="target"):
        apgd_objective(logits, y, "dlr_targeted")


def _checkpoints_by_hand(steps: int) -> list[int]:
    """w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(pj * steps) for pj in p})


def test_checkpoint_schedule() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (next would be 1.05 > 1).
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert _checkpoints_by_hand(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # N = 10: ceil(2.2)=3, ceil(4.1)=5, ceil(5.7)=6, 7, 8, ceil(8.7)=9, ceil(9.3)=10, ceil(9.9)=10.
    assert apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]
    for steps in (1, 7, 20, 50, 250, 1000):
        assert apgd_checkpoints(steps) == _checkpoints_by_hand(steps)
    with pytest.raises(ValueError, match="steps"):
        apgd_checkpoints(0)


# ------------------------------------------------------------ exact linear references


def _linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """Logits ``W x + b`` of a flattened 1x4x4 image."""
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin).eval()


def _linear_problem(num_classes: int, n: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear classifier and inputs in [0.3, 0.7] labelled by its own predictions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, 16, generator=g)
    b = -(w @ torch.full((16,), 0.5))  # decision boundaries through the box centre
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=g)
    model = _linear_model(w, b)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


def _min_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """Exact minimal distance to misclassification of a linear model (box not binding):
    min over t != y of (z_y - z_t) / ||w_y - w_t||_dual (L1 for L-inf, L2 for L2)."""
    lin = model[1]
    with torch.no_grad():
        z = model(x)
        diffs = lin.weight[y][:, None, :] - lin.weight[None, :, :]  # (n, C, d): w_y - w_t
        dual = diffs.abs().sum(dim=2) if norm == "linf" else diffs.norm(dim=2)
        gaps = z.gather(1, y[:, None]) - z
        ratio = gaps / dual.clamp_min(1e-12)
        ratio[torch.arange(len(y)), y] = float("inf")
        return ratio.min(dim=1).values


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.03), ("l2", 0.1)])
def test_binary_linear_model_exact_distances(norm: str, eps: float) -> None:
    model, x, y = _linear_problem(2, 400, seed=0)
    dist = _min_distance(model, x, y, norm)
    breakable = dist < 0.999 * eps
    safe = dist > 1.001 * eps
    assert breakable.sum() > 50 and safe.sum() > 50  # both kinds are well represented
    x_adv = apgd_attack(model, x, y, norm=norm, eps=eps, steps=20, generator=seeded_generator(0))
    _assert_in_threat_model(x_adv, x, norm, eps)
    with torch.no_grad():
        broken = model(x_adv).argmax(dim=1) != y
    assert broken[breakable].all()
    assert not broken[safe].any()
    # For the unbreakable samples the best-loss point is the loss maximiser, x - eps * u with
    # u = sign(w_y - w_other) (L-inf) or the unit vector along it (L2).
    w = model[1].weight
    u = (w[y] - w[1 - y]).reshape(x.shape)
    u = u.sign() if norm == "linf" else u / u.reshape(len(x), -1).norm(dim=1).view(-1, 1, 1, 1)
    tol = 1e-6 if norm == "linf" else 2e-3
    torch.testing.assert_close(x_adv[safe], (x - eps * u)[safe], atol=tol, rtol=0)


@pytest.mark.parametrize(("variant", "num_classes"), [("ce", 4), ("dlr", 4), ("apgd_t", 4), ("apgd_t", 3)])
def test_multiclass_linear_model_exact_distances(variant: str, num_classes: int) -> None:
    """With C classes the exact L-inf distance is min_t (z_y - z_t) / ||w_y - w_t||_1.

    APGD-T tries every other class, so it must find every breakable sample. The
    untargeted losses push towards the top other class (DLR) or a mix (CE), which need
    not be the nearest one in L-inf, so they only have to find most of them.
    """
    eps = 0.03
    model, x, y = _linear_problem(num_classes, 400, seed=1)
    dist = _min_distance(model, x, y, "linf")
    breakable = dist < 0.999 * eps
    safe = dist > 1.001 * eps
    assert breakable.sum() > 100 and safe.sum() > 50
    if variant == "apgd_t":
        x_adv = apgd_targeted(model, x, y, eps=eps, steps=20, n_target_classes=9, generator=seeded_generator(0))
    else:
        x_adv = apgd_attack(model, x, y, eps=eps, steps=20, loss=variant, generator=seeded_generator(0))
    _assert_in_threat_model(x_adv, x, "linf", eps)
    with torch.no_grad():
        broken = model(x_adv).argmax(dim=1) != y
    assert not broken[safe].any()
    if variant == "apgd_t":
        assert broken[breakable].all()
    else:
        assert broken[breakable].float().mean() > 0.9
        assert broken[dist < 0.5 * eps].all()


# ------------------------------------------------------------------------ validation


def test_argument_validation(trained_cnn: nn.Module) -> None:
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    cases = [
        ({"norm": "l1"}, "norm"),
        ({"eps": -0.1}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"rho": 1.5}, "rho"),
        ({"restarts": 0}, "restarts"),
        ({"loss": "mse"}, "loss"),
        ({"loss": "dlr_targeted"}, "target"),
        ({"loss": "dlr_targeted", "target": torch.zeros(3, dtype=torch.long)}, "target"),
        ({"loss": "ce", "target": y}, "target"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            apgd_attack(trained_cnn, x, y, **{"eps": 0.03, "steps": 2, **kwargs})
    with pytest.raises(ValueError, match="y must"):
        apgd_attack(trained_cnn, x, y[:3], eps=0.03)
    with pytest.raises(ValueError, match="n_target_classes"):
        apgd_targeted(trained_cnn, x, y, eps=0.03, n_target_classes=0)
    two_class = _linear_model(torch.randn(2, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="num_classes >= 3"):
        apgd_targeted(two_class, torch.rand(4, 1, 4, 4), y, eps=0.03, steps=2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="autograd"):
        apgd_attack(trained_cnn, x, y, eps=0.03, steps=2)
