"""Tests for rayprune.robust.at_losses (PGD-AT and TRADES) against hand computations."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rayprune.robust.at_losses as at_losses
from rayprune.robust.at_losses import pgd_at_loss, trades_loss
from rayprune.robust.attacks import AttackConfig
from rayprune.robust.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model() -> SmallCNN:
    """A fresh tiny CNN with BatchNorm, in train mode, as during adversarial training."""
    torch.manual_seed(0)
    return SmallCNN(num_classes=4, width=4).train()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _smoothed_ce_by_hand(logits: torch.Tensor, y: torch.Tensor, ls: float) -> float:
    """Mean over samples of -sum_j target_j log softmax_j with target = (1-ls) onehot + ls/K."""
    total = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        k = len(row)
        log_z = math.log(sum(math.exp(v) for v in row))
        for j, v in enumerate(row):
            target = (1 - ls) * (j == label) + ls / k
            total -= target * (v - log_z)
    return total / len(y)


def _kl_by_hand(nat_logits: torch.Tensor, adv_logits: torch.Tensor) -> float:
    """sum_i sum_j p_ij (log p_ij - log q_ij) / B with p = softmax(nat), q = softmax(adv)."""
    p = F.softmax(nat_logits.double(), dim=1)
    q = F.softmax(adv_logits.double(), dim=1)
    return (p * (p.log() - q.log())).sum().item() / len(p)


def _accuracy_by_hand(logits: torch.Tensor, y: torch.Tensor) -> float:
    rows, labels = logits.tolist(), y.tolist()
    hits = sum(int(max(range(len(r)), key=r.__getitem__) == t) for r, t in zip(rows, labels))
    return hits / len(labels)


class _AttackSpy:
    """Wraps the real pgd_attack to record its config, output and the model mode it saw."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig,
                 **kwargs: Any) -> torch.Tensor:
        out = self.real(model, x, y, config, **kwargs)
        self.calls.append({"config": config, "x_adv": out, "modes": [m.training for m in model.modules()]})
        return out


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _AttackSpy:
    s = _AttackSpy(at_losses.pgd_attack)
    monkeypatch.setattr(at_losses, "pgd_attack", s)
    return s


# ------------------------------------------------------------------------------ TRADES


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_trades_without_perturbation_is_smoothed_ce(model: SmallCNN, batch: tuple, ls: float) -> None:
    x, y = batch
    cfg = AttackConfig("linf", 8 / 255, 2 / 255, 0, random_start=False)  # x_adv == x
    loss, stats = trades_loss(model, x, y, cfg, beta=5.0, label_smoothing=ls)
    with torch.no_grad():
        logits = model(x)
    expected = _smoothed_ce_by_hand(logits, y, ls)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["robust"] == pytest.approx(0.0, abs=1e-6)
    assert stats["natural"] == pytest.approx(expected, abs=1e-5)
    assert stats["clean_acc"] == stats["adv_acc"] == pytest.approx(_accuracy_by_hand(logits, y))


def test_trades_is_natural_plus_beta_kl(model: SmallCNN, batch: tuple, spy: _AttackSpy) -> None:
    x, y = batch
    beta, ls = 5.0, 0.1
    cfg = AttackConfig("linf", 8 / 255, 2 / 255, 3, loss="ce")  # loss is overridden to "kl"
    loss, stats = trades_loss(model, x, y, cfg, beta=beta, label_smoothing=ls,
                              generator=torch.Generator().manual_seed(0))
    (call,) = spy.calls
    assert call["config"].loss == "kl"
    assert not any(call["modes"])  # crafted in eval mode
    x_adv = call["x_adv"]
    assert (x_adv != x).any()
    with torch.no_grad():  # train mode: BN uses batch statistics, so outputs are reproducible
        nat, adv = model(x), model(x_adv)
    natural = _smoothed_ce_by_hand(nat, y, ls)
    robust = _kl_by_hand(nat, adv)
    assert robust > 1e-6
    assert loss.item() == pytest.approx(natural + beta * robust, rel=1e-5, abs=1e-6)
    assert stats["loss"] == pytest.approx(loss.item())
    assert stats["natural"] == pytest.approx(natural, abs=1e-5)
    assert stats["robust"] == pytest.approx(robust, rel=1e-4, abs=1e-7)
    assert stats["clean_acc"] == pytest.approx(_accuracy_by_hand(nat, y))
    assert stats["adv_acc"] == pytest.approx(_accuracy_by_hand(adv, y))


def test_trades_gradients_reach_parameters_only_through_loss(model: SmallCNN, batch: tuple) -> None:
    x, y = batch
    cfg = AttackConfig.linf_8_255(steps=2)
    loss, _ = trades_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())  # the attack left no gradients behind
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.body[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ PGD-AT


def _textbook_pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                       steps: int) -> torch.Tensor:
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("attack_loss", ["ce", "cw"])
def test_pgd_at_equals_textbook_madry(model: SmallCNN, batch: tuple, attack_loss: str) -> None:
    """Eval-mode CE attack, then CE in train mode (the attack loss is always CE)."""
    x, y = batch
    eps, alpha, steps = 8 / 255, 2 / 255, 4
    ref_model = copy.deepcopy(model).eval()
    x_adv = _textbook_pgd_linf(ref_model, x, y, eps, alpha, steps)
    ref_model.train()
    ref_logits = ref_model(x_adv)
    ref_loss = F.cross_entropy(ref_logits, y)

    cfg = AttackConfig("linf", eps, alpha, steps, loss=attack_loss, random_start=False)
    loss, stats = pgd_at_loss(model, x, y, cfg, attack_mode="eval")
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert stats["loss"] == pytest.approx(ref_loss.item(), abs=1e-6)
    assert stats["adv_acc"] == pytest.approx(_accuracy_by_hand(ref_logits.detach(), y))
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.body[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("start_train", "attack_mode", "attack_sees_train", "bn_updates"),
    [
        (True, "eval", False, 1),  # only the loss forward updates BN statistics
        (True, "train", True, 4),  # 3 attack steps + the loss forward
        (False, "train", True, 3),  # loss forward in the restored eval mode: no update
        (True, "current", True, 4),
        (False, "current", False, 0),
    ],
)
def test_attack_mode_is_used_then_restored(
    model: SmallCNN,
    batch: tuple,
    spy: _AttackSpy,
    start_train: bool,
    attack_mode: str,
    attack_sees_train: bool,
    bn_updates: int,
) -> None:
    x, y = batch
    model.train(start_train)
    model.body[1].eval()  # one frozen BatchNorm: per-module flags must be restored
    flags = [m.training for m in model.modules()]
    bn = model.body[4]
    tracked = bn.num_batches_tracked.item()
    pgd_at_loss(model, x, y, AttackConfig("linf", 8 / 255, 2 / 255, 3), attack_mode=attack_mode,
                generator=torch.Generator().manual_seed(0))
    assert [m.training for m in model.modules()] == flags
    (call,) = spy.calls
    if attack_mode == "current":
        assert call["modes"] == flags
    else:
        assert set(call["modes"]) == {attack_sees_train}
    assert bn.num_batches_tracked.item() - tracked == bn_updates


class _FailsInEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            raise RuntimeError("eval forward failed")
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("fn", [pgd_at_loss, trades_loss])
def test_mode_restored_when_attack_raises(fn: Any, batch: tuple) -> None:
    x, y = batch
    model = _FailsInEval().train()
    with pytest.raises(RuntimeError, match="eval forward failed"):
        fn(model, x, y, AttackConfig.linf_8_255(steps=1), attack_mode="eval")
    assert model.training


# -------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"attack_mode": "inference"}, "attack_mode"),
    ],
)
def test_trades_validation(model: SmallCNN, batch: tuple, kwargs: dict, name: str) -> None:
    x, y = batch
    with pytest.raises(ValueError, match=name):
        trades_loss(model, x, y, AttackConfig.linf_8_255(steps=1), **kwargs)


def test_pgd_at_validation(model: SmallCNN, batch: tuple) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="attack_mode 'inference'; allowed: eval, train, current"):
        pgd_at_loss(model, x, y, AttackConfig.linf_8_255(steps=1), attack_mode="inference")
    with pytest.raises(ValueError, match="y must"):
        pgd_at_loss(model, x, y[:3], AttackConfig.linf_8_255(steps=1))
