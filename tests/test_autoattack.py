"""FAB-T, Square and the AutoAttack protocol, against independent references: an LP/QP
solver for FAB's projection, APGD's perturbations, ART's Square, and a model whose
gradients are masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_small_cnn
from torch import nn

from rayprune.robust.apgd import apgd_targeted
from rayprune.robust.evaluation import EvalConfig, broken_by, gradient_masking_warning, robust_correct, summarize
from rayprune.robust.fab import fab_targeted, project_on_hyperplane
from rayprune.robust.square import l2_pattern, p_at, square_attack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = {"linf": 6 / 255, "l2": 0.25}


@pytest.fixture(scope="module")
def model(blob_sampler):
    return fit_small_cnn(blob_sampler, 2000, 300)


@pytest.fixture(scope="module")
def batch(blob_sampler):
    return blob_sampler(96, 7)


def _norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


# ------------------------------------------------------------------ FAB's projection


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_onto_a_hyperplane_in_the_box_matches_an_lp_and_qp_solver(norm):
    from scipy.optimize import linprog, minimize

    rng = np.random.default_rng(0)
    for _ in range(12):
        d = 7
        p, w, c = rng.random(d), rng.normal(size=d), rng.normal() * 0.6
        got = project_on_hyperplane(torch.tensor(p[None]), torch.tensor(w[None]), torch.tensor([c]), norm)[0].numpy()
        bounds = [(-a, 1 - a) for a in p]
        if norm == "linf":  # min t  s.t.  |d_i| <= t, w.d = c, box
            a_ub = np.r_[np.c_[np.eye(d), -np.ones(d)], np.c_[-np.eye(d), -np.ones(d)]]
            ref = linprog(np.r_[np.zeros(d), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0][None],
                          b_eq=[c], bounds=[*bounds, (0, None)])
            best = ref.x[-1] if ref.success else None
            size = np.abs(got).max()
        else:
            ref = minimize(lambda z: (z ** 2).sum(), np.zeros(d), method="SLSQP", bounds=bounds,
                           constraints=[{"type": "eq", "fun": lambda z, w=w, c=c: w @ z - c}])
            best = np.sqrt((ref.x ** 2).sum()) if ref.success else None
            size = np.sqrt((got ** 2).sum())
        assert ((p + got) >= -1e-12).all() and ((p + got) <= 1 + 1e-12).all()
        if best is not None:  # reachable: on the hyperplane, at the solver's minimal size
            assert w @ got == pytest.approx(c, abs=1e-6)
            assert size == pytest.approx(best, rel=1e-5, abs=1e-7)


def test_an_unreachable_hyperplane_gets_the_largest_move_toward_it():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    d = project_on_hyperplane(p, w, torch.tensor([5.0], dtype=torch.float64), "linf")
    torch.testing.assert_close(d, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


# ------------------------------------------------------------------ FAB-T


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_small_misclassified_points_inside_the_ball(model, batch, norm):
    x, y = batch
    eps = EPS[norm]
    adv = fab_targeted(model, x, y, norm=norm, eps=eps, steps=30, n_target_classes=3,
                       generator=torch.Generator().manual_seed(0))
    changed = (adv != x).flatten(1).any(dim=1)
    with torch.no_grad():
        wrong = model(adv).argmax(1) != y
        clean_ok = model(x).argmax(1) == y
    assert (_norms(adv - x, norm) <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    assert wrong[changed].all()  # every point it returns changed is adversarial
    assert changed.sum() >= 5  # and it does find some at this eps
    apgd = apgd_targeted(model, x, y, norm=norm, eps=eps, steps=30, n_target_classes=3,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = changed & clean_ok & (model(apgd).argmax(1) != y)
    assert both.sum() >= 3
    # A minimal-perturbation attack: at least as close as APGD's points (which maximise a loss in the ball).
    assert (_norms(adv - x, norm)[both] <= _norms(apgd - x, norm)[both] + 1e-6).all()


# ------------------------------------------------------------------ Square


def test_square_schedule_and_l2_pattern():
    assert [p_at(i, 10_000, 0.8, False) for i in (0, 10, 11, 50, 51, 8001)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512]
    assert p_at(500, 1000, 0.8, True) == p_at(5000, 10_000, 0.8, False)  # compressed onto a smaller budget
    pattern = l2_pattern(5)
    assert pattern.norm().item() == pytest.approx(1.0)
    assert (pattern[:2] > 0).all() and (pattern[2:] < 0).all()  # a positive and a negative half
    assert pattern[1, 2] == pattern[:2].max()  # the positive half peaks at its centre


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_stays_in_the_ball_and_box_is_seeded_and_never_touches_gradients(model, batch, norm):
    x, y = batch
    eps = EPS[norm]
    model.train()
    runs = [square_attack(model, x, y, norm=norm, eps=eps, n_queries=60, rescale_schedule=True,
                          generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert (_norms(runs[0] - x, norm) <= eps * (1 + 1e-5)).all() and runs[0].min() >= 0 and runs[0].max() <= 1


def test_square_is_as_strong_as_art_on_the_same_model_and_budget(model, blob_sampler):
    """The Adversarial Robustness Toolbox's Square (L-inf, same p_init, same query budget with
    its schedule spread over it) as an independent reference: robust accuracies agree."""
    import art  # the test extra installs it: a missing reference is a failure, not a skip
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import PyTorchClassifier

    x, y = blob_sampler(150, 11)
    eps, queries = 10 / 255, 300
    ours = square_attack(model, x, y, norm="linf", eps=eps, n_queries=queries, rescale_schedule=True,
                         generator=torch.Generator().manual_seed(0))
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 8, 8), nb_classes=4,
                                   clip_values=(0.0, 1.0))
    np.random.seed(0)  # ART draws from numpy's global generator
    theirs = SquareAttack(estimator=classifier, norm=np.inf, max_iter=queries, eps=eps, p_init=0.8, nb_restarts=1,
                          batch_size=150, verbose=False).generate(x=x.numpy(), y=y.numpy())
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        acc_ours = (model(ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(torch.from_numpy(theirs)).argmax(1) == y).float().mean().item()
    assert art.__version__ and acc_theirs < clean - 0.1  # the reference attack does bite here
    assert acc_ours <= acc_theirs + 0.06


class Quantised(nn.Module):
    """Rounds inputs to 1/16 steps before the classifier: the rounding has zero gradient,
    so gradient attacks see nothing to follow (masked gradients), while the model's
    decisions still move with the input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 16) / 16)


def test_square_breaks_a_model_with_masked_gradients_where_gradient_attacks_fail(model, batch):
    x, y = batch
    masked = Quantised(model).eval()
    config = EvalConfig(eps=8 / 255, apgd_steps=20, apgd_targets=3, fab_steps=20, fab_targets=3, square_queries=300,
                        attacks=("clean", "apgd_ce", "apgd_t", "fab_t", "square"), protocol="every_attack",
                        batch_size=96)
    metrics = summarize(robust_correct(masked, x, y, config, generator=torch.Generator().manual_seed(0)))
    gradient = min(metrics[a] for a in ("apgd_ce", "apgd_t", "fab_t"))
    assert gradient >= metrics["clean"] - 0.05  # the gradient attacks barely find anything
    assert metrics["square"] < gradient - 0.15  # Square does
    warning = gradient_masking_warning(metrics, config.attacks, config.protocol)
    assert warning is not None and "mask its gradients" in warning
    assert gradient_masking_warning({**metrics, "square": gradient}, config.attacks, config.protocol) is None


# ------------------------------------------------------------------ the protocol


def _small(**kwargs) -> EvalConfig:
    base = {"eps": 6 / 255, "apgd_steps": 10, "apgd_targets": 3, "fab_steps": 10, "fab_targets": 3,
            "square_queries": 40, "batch_size": 32, "attacks": ("clean", "apgd_ce", "apgd_t", "fab_t", "square"),
            "protocol": "autoattack"}
    return EvalConfig(**{**base, **kwargs})


def test_the_autoattack_cascade_is_cumulative_and_names_the_attack_that_broke_each_sample(model, batch):
    x, y = batch
    config = _small()
    correct = robust_correct(model, x, y, config, generator=torch.Generator().manual_seed(1))
    order = config.attacks
    for before, after in zip(order, order[1:]):
        assert (correct[after] <= correct[before]).all()  # each attack only removes survivors
    np.testing.assert_array_equal(correct["worst"], correct[order[-1]])
    by = broken_by(correct, order)
    assert set(by) <= {"", *order}
    np.testing.assert_array_equal(by == "", correct["worst"])
    for name in order:  # a sample broken by an attack was still correct just before it
        rows = by == name
        assert not correct[name][rows].any()
        if name != order[0]:
            assert correct[order[order.index(name) - 1]][rows].all()


def test_evaluating_in_shards_of_whole_batches_equals_evaluating_at_once(model, batch):
    x, y = batch  # 96 samples = 3 batches of 32
    config = _small()
    whole = robust_correct(model, x, y, config, generator=torch.Generator().manual_seed(5))
    first = robust_correct(model, x[:32], y[:32], config, generator=torch.Generator().manual_seed(5))
    rest = robust_correct(model, x[32:], y[32:], config, generator=torch.Generator().manual_seed(5), first_batch=1)
    for name in whole:
        np.testing.assert_array_equal(np.concatenate([first[name], rest[name]]), whole[name])


@pytest.mark.parametrize("n_samples,batch_size,n_actors",
                         [(96, 32, 2), (100, 32, 3), (100, 32, 9), (5, 32, 4), (1, 1, 1)])
def test_shards_are_contiguous_runs_of_whole_batches_covering_every_sample(n_samples, batch_size, n_actors):
    from rayprune.stages.evaluate import batch_shards

    shards = batch_shards(n_samples, batch_size, n_actors)
    assert 1 <= len(shards) <= n_actors
    covered = np.concatenate([np.arange(lo, hi) for lo, hi, _ in shards])
    np.testing.assert_array_equal(covered, np.arange(n_samples))  # every sample once, in order
    for lo, hi, first in shards:
        assert lo == first * batch_size  # a shard starts on a batch boundary and knows its global batch index
        assert hi == n_samples or (hi - lo) % batch_size == 0
