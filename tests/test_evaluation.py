"""Tests for rayprune.robust.evaluation: per-attack correctness, the worst case, config checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Sampler, fit_small_cnn, seeded_generator
from torch import nn

from rayprune.robust.attacks import AttackConfig
from rayprune.robust.evaluation import (
    EVAL_ATTACKS,
    EvalConfig,
    robust_correct,
    summarize,
)
from rayprune.robust.models import SmallCNN

LINF_EPS = 6 / 255  # the tiny model's PGD accuracy sits mid-range (~40-50%) here

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained_cnn(blob_sampler: Sampler) -> SmallCNN:
    """A width-8 SmallCNN after 100 Adam steps, the last 40 of them PGD-2 adversarial, in eval mode."""
    return fit_small_cnn(blob_sampler, 2048, 100, pgd_from=60, pgd_eps=2 / 255)


@pytest.fixture(scope="module")
def eval_batch(blob_sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """200 blob images the model has not seen (the other attack tests use ``sample_batch``, 256)."""
    return blob_sampler(200, 3)


def _fast(**kwargs: object) -> EvalConfig:
    """Every attack, with budgets small enough for tests."""
    base: dict = {"eps": LINF_EPS, "pgd_steps": 10, "apgd_steps": 15, "apgd_targets": 3, "fab_steps": 10,
                  "fab_targets": 3, "square_queries": 40, "batch_size": 64}
    return EvalConfig(**{**base, **kwargs})


def textbook_pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                          steps: int, seed: int) -> float:
    """Accuracy under Madry et al. L-inf PGD: uniform random start, sign steps of eps/4, clip."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + eps / 4 * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        return (model(x_adv).argmax(dim=1) == y).float().mean().item()


# ------------------------------------------------------------------ robust_correct


def test_worst_is_and_and_clean_is_argmax(trained_cnn: nn.Module, eval_batch: tuple) -> None:
    x, y = eval_batch
    correct = robust_correct(trained_cnn, x, y, _fast(), generator=seeded_generator(0))
    assert set(correct) == {*EVAL_ATTACKS, "worst"}
    for value in correct.values():
        assert isinstance(value, np.ndarray) and value.dtype == bool and value.shape == (len(x),)
    expected_worst = np.ones(len(x), dtype=bool)
    for name in EVAL_ATTACKS:
        expected_worst &= correct[name]
    np.testing.assert_array_equal(correct["worst"], expected_worst)
    with torch.no_grad():
        clean = (trained_cnn(x).argmax(dim=1) == y).numpy()
    np.testing.assert_array_equal(correct["clean"], clean)
    for name in EVAL_ATTACKS:  # no attack "repairs" a clean-misclassified sample
        assert not (correct[name] & ~clean).any()

    summary = summarize(correct)
    assert summary["n"] == len(x)
    assert summary["clean"] == pytest.approx(clean.mean())
    for name, value in correct.items():
        assert summary[name] == pytest.approx(value.mean())
    assert summary["worst"] <= min(summary[name] for name in EVAL_ATTACKS)
    assert summary["clean"] - summary["worst"] > 0.2  # the attacks do something here


def test_worst_at_most_textbook_pgd(trained_cnn: nn.Module, eval_batch: tuple) -> None:
    x, y = eval_batch
    textbook = textbook_pgd_accuracy(trained_cnn, x, y, LINF_EPS, steps=20, seed=11)
    correct = robust_correct(trained_cnn, x, y, _fast(pgd_steps=20), generator=seeded_generator(1))
    summary = summarize(correct)
    assert 0.15 < textbook < summary["clean"] - 0.2  # a mid-range regime, not a trivial one
    assert summary["worst"] <= textbook
    assert summary["apgd_ce"] <= textbook + 0.02
    assert summary["pgd_ce"] == pytest.approx(textbook, abs=0.05)  # same attack, other random start


def test_standard_budget_on_small_batch(trained_cnn: nn.Module, eval_batch: tuple) -> None:
    x, y = eval_batch
    x, y = x[:8], y[:8]  # AutoAttack's full budget: a handful of samples, in two batches
    config = EvalConfig.standard("linf", LINF_EPS, batch_size=4)
    summary = summarize(robust_correct(trained_cnn, x, y, config, generator=seeded_generator(2)))
    assert summary["n"] == 8
    assert summary["worst"] <= textbook_pgd_accuracy(trained_cnn, x, y, LINF_EPS, steps=20, seed=11)


def test_per_attack_result_independent_of_other_attacks(trained_cnn: nn.Module,
                                                        eval_batch: tuple) -> None:
    """Each attack's array is what that attack alone gives (every attack sees every
    clean-correct sample), so dropping other attacks from the config changes nothing."""
    x, y = eval_batch
    x, y = x[:100], y[:100]
    full = robust_correct(trained_cnn, x, y, _fast(), generator=seeded_generator(3))
    for name in ("pgd_cw", "apgd_t"):
        alone = robust_correct(trained_cnn, x, y, _fast(attacks=(name,)), generator=seeded_generator(3))
        assert set(alone) == {name, "worst"}
        np.testing.assert_array_equal(alone[name], full[name])
        np.testing.assert_array_equal(alone["worst"], full[name])


def test_clean_only_is_batch_size_invariant(trained_cnn: nn.Module, eval_batch: tuple) -> None:
    x, y = eval_batch
    one = robust_correct(trained_cnn, x, y, _fast(attacks=("clean",), batch_size=7))
    two = robust_correct(trained_cnn, x, y, _fast(attacks=("clean",), batch_size=500))
    np.testing.assert_array_equal(one["clean"], two["clean"])
    np.testing.assert_array_equal(one["worst"], one["clean"])


def test_modes_inputs_and_grads_untouched(trained_cnn: nn.Module, eval_batch: tuple) -> None:
    x, y = eval_batch
    x, y = x[:40], y[:40]
    model = copy.deepcopy(trained_cnn).train()
    model.body[1].eval()  # mixed modes must come back exactly
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_before = x.clone()
    correct = robust_correct(model, x, y, _fast(batch_size=16), generator=seeded_generator(4))
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # eval mode: BN running stats not updated
        assert torch.equal(value, state[key]), key
    assert torch.equal(x, x_before)
    # Evaluated in eval mode: same clean result as the eval-mode fixture.
    with torch.no_grad():
        np.testing.assert_array_equal(correct["clean"], (trained_cnn(x).argmax(dim=1) == y).numpy())


def test_robust_correct_rejects_bad_inputs(trained_cnn: nn.Module) -> None:
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="EvalConfig"):
        robust_correct(trained_cnn, x, y, AttackConfig("linf", 0.03, 0.01, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="y must"):
        robust_correct(trained_cnn, x, y[:3], _fast())


# ------------------------------------------------------------------------- summarize


def test_summarize_by_hand() -> None:
    correct = {"clean": np.array([True, True, False, True]),
               "pgd_ce": np.array([True, False, False, False]),
               "worst": np.array([True, False, False, False])}
    assert summarize(correct) == {"clean": 0.75, "pgd_ce": 0.25, "worst": 0.25, "n": 4}
    empty = summarize({"clean": np.zeros(0, dtype=bool)})
    assert empty["n"] == 0 and np.isnan(empty["clean"])
    with pytest.raises(ValueError, match="equal lengths"):
        summarize({"clean": np.ones(3, dtype=bool), "worst": np.ones(2, dtype=bool)})


# ------------------------------------------------------------------------ EvalConfig


def test_defaults_and_standard_preset() -> None:
    default = EvalConfig()
    assert (default.norm, default.eps, default.pgd_steps, default.pgd_step_size, default.apgd_steps,
            default.apgd_targets, default.apgd_restarts, default.fab_steps, default.fab_targets,
            default.square_queries, default.batch_size, default.attacks, default.protocol) == (
        "linf", 8 / 255, 20, None, 100, 9, 1, 100, 9, 5000, 256, EVAL_ATTACKS, "every_attack")
    assert default.step_size == pytest.approx(2 / 255)
    assert EvalConfig(pgd_step_size=0.01).step_size == 0.01
    std = EvalConfig.standard("l2", 0.5)
    assert (std.norm, std.eps, std.apgd_steps, std.apgd_targets, std.apgd_restarts, std.fab_steps,
            std.fab_targets, std.square_queries, std.attacks, std.protocol) == (
        "l2", 0.5, 100, 9, 1, 100, 9, 5000, ("clean", "apgd_ce", "apgd_t", "fab_t", "square"), "autoattack")
    assert std.reductions(num_classes=10) == [] and std.reductions(num_classes=4) == []
    assert _fast(protocol="autoattack", attacks=("clean", "apgd_ce", "apgd_t", "fab_t", "square")).reductions(10) == [
        "APGD steps 15 < 100", "APGD-T targets 3 < 9", "FAB-T steps 10 < 100", "FAB-T targets 3 < 9",
        "Square queries 40 < 5000"]
    cw = EvalConfig(norm="l2", eps=0.5).pgd_config("cw")
    assert (cw.norm, cw.eps, cw.step_size, cw.steps, cw.loss, cw.random_start) == (
        "l2", 0.5, 0.125, 20, "cw", True)
    assert EvalConfig(attacks=["apgd_t", "clean"]).attacks == ("apgd_t", "clean")  # list -> tuple


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"norm": "l1"}, "norm"),
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"pgd_steps": 0}, "pgd_steps"),
        ({"pgd_step_size": -1.0}, "pgd_step_size"),
        ({"apgd_steps": 1.5}, "apgd_steps"),
        ({"apgd_targets": 0}, "apgd_targets"),
        ({"apgd_restarts": True}, "apgd_restarts"),
        ({"batch_size": 0}, "batch_size"),
        ({"fab_steps": 0}, "fab_steps"),
        ({"square_queries": -1}, "square_queries"),
        ({"protocol": "cascade"}, "protocol"),
        ({"attacks": ()}, "attacks"),
        ({"attacks": "clean"}, "attacks"),
        ({"attacks": ("clean", "clean")}, "attacks"),
    ],
)
def test_eval_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EvalConfig(**kwargs)


def test_unknown_attack_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="square") as info:
        EvalConfig(attacks=("clean", "fab"))
    for name in EVAL_ATTACKS:
        assert name in str(info.value)
