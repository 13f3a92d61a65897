"""Tests for rayprune.robust.ema.ModelEMA against an explicit reference update."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayprune.robust.ema import ModelEMA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _sgd_steps(model: nn.Module, n: int, seed: int) -> Iterator[None]:
    """Yield after each of ``n`` SGD steps in train mode on random data."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(n):
        x = torch.rand(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


@pytest.mark.parametrize("warmup", [True, False])
def test_matches_reference_update(warmup: bool) -> None:
    model = _tiny_bn_net(0)
    decay = 0.9
    ema = ModelEMA(model, decay=decay, warmup=warmup)
    ref = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    used = []
    for t, _ in enumerate(_sgd_steps(model, 5, seed=1)):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        used.append(ema.current_decay())
        for n, p in model.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
        ema.update(model)
    expected_decays = [0.1, 2 / 11, 3 / 12, 4 / 13, 5 / 14] if warmup else [decay] * 5
    assert used == pytest.approx(expected_decays)
    assert ema.num_updates == 5
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), ref[n], atol=1e-6, rtol=1e-6)
        assert not torch.equal(p, dict(model.named_parameters())[n])  # really averaged
    # Buffers are copied, not averaged.
    for (n, b), (_, live) in zip(ema.module.named_buffers(), model.named_buffers()):
        assert torch.equal(b, live), n
    assert ema.module[1].num_batches_tracked.item() == 5


def test_warmup_is_capped_by_decay() -> None:
    ema = ModelEMA(_tiny_bn_net(0), decay=0.5, warmup=True)
    ema.num_updates = 100
    assert ema.current_decay() == 0.5
    ema.num_updates = 3  # (1 + 3) / (10 + 3) < 0.5
    assert ema.current_decay() == pytest.approx(4 / 13)


def test_averaged_copy_is_frozen_and_independent() -> None:
    model = _tiny_bn_net(0)
    ema = ModelEMA(model, decay=0.99)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        model[5].weight.add_(1.0)
    assert not torch.equal(ema.module[5].weight, model[5].weight)


def test_state_dict_round_trip_continues_identically() -> None:
    live_a = _tiny_bn_net(0)
    uninterrupted = ModelEMA(live_a, decay=0.95)
    steps_a = _sgd_steps(live_a, 6, seed=2)
    for _ in range(3):
        next(steps_a)
        uninterrupted.update(live_a)
    state = copy.deepcopy(uninterrupted.state_dict())

    # "Resume": a fresh EMA built from a differently-initialised model, then loaded.
    resumed = ModelEMA(_tiny_bn_net(123), decay=0.5, warmup=False)
    resumed.load_state_dict(state)
    assert (resumed.decay, resumed.warmup, resumed.num_updates) == (0.95, True, 3)
    # The remaining three live updates are fed to both.
    for _ in range(3):
        next(steps_a)
        uninterrupted.update(live_a)
        resumed.update(live_a)
    for (n, p), (_, q) in zip(uninterrupted.module.state_dict().items(), resumed.module.state_dict().items()):
        assert torch.equal(p, q), n


def test_unwraps_data_parallel() -> None:
    model = _tiny_bn_net(0)
    wrapped = nn.DataParallel(model)  # CPU-only: behaves as a plain wrapper
    ema = ModelEMA(wrapped, decay=0.9)
    assert isinstance(ema.module, nn.Sequential)
    ema.update(wrapped)
    assert ema.num_updates == 1


def test_validation() -> None:
    model = _tiny_bn_net(0)
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="decay"):
            ModelEMA(model, decay=bad)
    ema = ModelEMA(model, decay=0.9)
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model must have the same parameter"):
        ema.update(other)
    with pytest.raises(ValueError, match="num_updates"):
        ema.load_state_dict({"module": ema.module.state_dict(), "decay": 0.9, "warmup": True})
