"""Final-training pieces: validation split, batch mixing, compute accounting."""

import numpy as np
import pytest

from rayprune.config import load_config
from rayprune.pipeline import compute_budget
from rayprune.robust.loop import MixedBatchStream, mix_counts
from rayprune.stages.final import final_steps_per_epoch, split_train_val


def test_validation_takes_the_lowest_real_ids_and_training_the_rest():
    ids = np.array([9, 3, 7, 1, 5, 2, 8])
    sources = np.array(["synthetic", "real", "synthetic", "synthetic", "real", "real", "synthetic"], dtype=object)
    train, val = split_train_val(ids, sources, ("synthetic",), 2)
    np.testing.assert_array_equal(val, [2, 3])
    np.testing.assert_array_equal(train, [1, 5, 7, 8, 9])
    train, val = split_train_val(ids, np.full(7, "synthetic", dtype=object), ("synthetic",), 3)
    np.testing.assert_array_equal(val, [1, 2, 3])  # no real part: lowest ids
    with pytest.raises(ValueError, match="leaves no training samples"):
        split_train_val(ids[:2], np.array(["real", "real"], dtype=object), ("synthetic",), 5)


def test_mixed_batches_take_exact_counts_and_cover_each_group():
    syn, real = np.arange(0, 40), np.arange(100, 110)
    counts = mix_counts(10, 0.8, len(syn), len(real))
    assert counts == [8, 2]
    stream = MixedBatchStream([syn, real], counts, seed=0)
    batches = [stream.next() for _ in range(5)]
    for b in batches:
        assert (b < 100).sum() == 8 and (b >= 100).sum() == 2
    drawn = np.concatenate(batches)
    assert sorted(drawn[drawn < 100]) == list(range(40))  # 5 batches x 8 = one pass over syn
    assert mix_counts(10, 0.8, 0, 5) == [0, 10] and mix_counts(10, 0.8, 5, 0) == [10, 0]
    replay = MixedBatchStream([syn, real], counts, seed=0)
    np.testing.assert_array_equal(np.concatenate([replay.next() for _ in range(5)]), drawn)


def test_compute_budget_counts_passes_per_sample():
    config = load_config(None, {"attack.steps": "3", "train.epochs": "12", "train.batch_size": "10",
                                "final.train.epochs": "4", "final.train.batch_size": "10"})
    budget = compute_budget(config, scoring_steps=60, n_prunable=1000, n_subset=100, n_pool_train=2000, final_steps=40)
    assert budget["scoring_training"] == {"spent": 60 * 10 * 4, "whole_pool": 60 * 10 * 4}
    assert budget["scoring_recording"] == {"spent": 12 * 5 * 100, "whole_pool": 12 * 5 * 1000}
    assert budget["final_training"] == {"spent": 40 * 10 * 4, "whole_pool": 4 * 200 * 10 * 4}
    assert budget["pool_pass"] == {"spent": 0, "whole_pool": 0}  # no pool size given
    budget = compute_budget(config, 60, 1000, 100, 2000, 40, n_pool=2100)
    assert budget["pool_pass"] == {"spent": 2100, "whole_pool": 0}  # one forward pass per row (clean signals)
    adv = load_config(None, {"attack.steps": "3", "extrapolation.signals": "adv"})
    assert compute_budget(adv, 60, 1000, 100, 2000, 40, n_pool=2100)["pool_pass"]["spent"] == 2100 * (1 + 4)
    knn = load_config(None, {"attack.steps": "3", "extrapolation.model": "knn", "extrapolation.signals": "adv"})
    assert compute_budget(knn, 60, 1000, 100, 2000, 40, n_pool=2100)["pool_pass"]["spent"] == 2100
    assert final_steps_per_epoch(config, n_real=95, n_train=1000) == 10  # sized by the real part
    assert final_steps_per_epoch(config, n_real=0, n_train=1000) == 100  # no real part: the pool
