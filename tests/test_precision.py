"""Mixed precision: bf16/fp16 autocast training follows fp32, attacks in bf16 stay in the
ball and the box, and evaluation attacks in fp32 even inside a caller's autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_small_cnn

from rayprune.robust.attacks import AttackConfig, pgd_attack
from rayprune.robust.evaluation import EvalConfig, robust_correct
from rayprune.robust.loop import ATConfig, BatchStream, IndexedBatches, train_steps
from rayprune.robust.models import SmallCNN
from rayprune.robust.precision import autocast, full_precision, grad_scaler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATTACK = AttackConfig(norm="linf", eps=4 / 255, step_size=1 / 255, steps=3, random_start=True)


def _losses(precision: str, blob_sampler, chunks: int = 6, steps: int = 10) -> list[float]:
    """Mean loss of each chunk of ``steps`` PGD-AT steps from the same start, data and seeds."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = blob_sampler(512, 1)
    batches = IndexedBatches(x, y, BatchStream(len(x), 64, seed=0))
    recipe = ATConfig(lr=0.1, schedule="constant", augment=False, precision=precision)
    scaler = grad_scaler(precision, "cpu")
    return [train_steps(model, optimizer, batches, ATTACK, recipe, steps=steps, first_step=c * steps,
                        total_steps=chunks * steps, generator=torch.Generator().manual_seed(c),
                        scaler=scaler)["loss"] for c in range(chunks)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_run_learns_as_the_fp32_run_does(blob_sampler, precision):
    fp32, mixed = _losses("fp32", blob_sampler), _losses(precision, blob_sampler)
    assert fp32[-1] < 0.8 * fp32[0]  # the reference run learns
    assert mixed[-1] < 0.8 * mixed[0]  # and so does the mixed-precision one
    np.testing.assert_allclose(mixed, fp32, rtol=0.1, atol=0.05)  # along the same curve
    assert mixed != fp32  # it did run in lower precision


def test_pgd_in_bf16_stays_in_the_ball_and_the_box(blob_sampler):
    model = fit_small_cnn(blob_sampler, 1000, 150)
    x, y = blob_sampler(128, 5)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        config = AttackConfig(norm=norm, eps=eps, step_size=eps / 4, steps=5, random_start=True)
        with autocast("bf16", "cpu"):
            assert model(x).dtype == torch.bfloat16  # the model really runs in bf16 here
            adv = pgd_attack(model, x, y, config, generator=torch.Generator().manual_seed(0))
        assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps * (1 + 1e-5)).all()


def test_evaluation_attacks_in_fp32_even_inside_a_bf16_autocast_block(blob_sampler):
    model = fit_small_cnn(blob_sampler, 1000, 150)
    x, y = blob_sampler(96, 6)
    config = EvalConfig(eps=6 / 255, apgd_steps=10, apgd_targets=3, fab_steps=10, fab_targets=3, square_queries=30,
                        batch_size=32, attacks=("clean", "apgd_ce", "apgd_t", "fab_t", "square"))
    want = robust_correct(model, x, y, config, generator=torch.Generator().manual_seed(0))
    with autocast("bf16", "cpu"):
        got = robust_correct(model, x, y, config, generator=torch.Generator().manual_seed(0))
        with full_precision("cpu"):
            assert model(x).dtype == torch.float32  # what robust_correct does inside
        assert model(x).dtype == torch.bfloat16  # what it would otherwise have run in
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        ATConfig(precision="fp8")
    assert grad_scaler("bf16", "cpu") is None and grad_scaler("fp16", "cpu") is not None


def test_reduced_precision_on_cpu_workers_is_warned_about_by_name():
    from rayprune.config import load_config
    from rayprune.pipeline import precision_warning

    assert precision_warning(load_config(None, {}), use_gpu=False) is None  # fp32: nothing to say
    config = load_config(None, {"final.train.precision": "bf16"})
    warning = precision_warning(config, use_gpu=False)
    assert warning is not None and warning.startswith("final.train.precision=bf16 on CPU workers")
    assert precision_warning(config, use_gpu=True) is None
