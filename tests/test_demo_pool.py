"""The demo pool: deterministic, structured, with the truths it claims to plant."""

import numpy as np
import pytest

from rayprune.data.demo_pool import BLOCK_ROWS, DemoPoolSpec, generate_rows

SPEC = DemoPoolSpec(n_real=700, n_synthetic=2600, image_size=12, num_classes=5, seed=3)


@pytest.fixture(scope="module")
def rows():
    return generate_rows(SPEC)


def test_rows_do_not_depend_on_chunking(rows):
    cuts = [0, 1, BLOCK_ROWS - 3, BLOCK_ROWS + 5, 2 * BLOCK_ROWS, SPEC.n_rows]
    for start, stop in zip(cuts[:-1], cuts[1:]):
        part = generate_rows(SPEC, start, stop - start)
        np.testing.assert_array_equal(part.images, rows.images[start:stop])
        np.testing.assert_array_equal(part.labels, rows.labels[start:stop])
        np.testing.assert_array_equal(part.ids, np.arange(start, stop))


def test_columns_and_sources(rows):
    assert rows.images.dtype == np.uint8 and rows.images.shape == (SPEC.n_rows, 12, 12, 3)
    assert (rows.sources[:700] == "real").all() and (rows.sources[700:] == "synthetic").all()
    assert rows.labels.min() >= 0 and rows.labels.max() < 5
    assert len(np.unique(rows.ids)) == SPEC.n_rows


def test_seed_changes_the_pool(rows):
    other = generate_rows(DemoPoolSpec(n_real=700, n_synthetic=2600, image_size=12, num_classes=5, seed=4), 0, 50)
    assert not np.array_equal(other.images, rows.images[:50])


def test_label_noise_rate_and_duplicates(rows):
    flipped = rows.labels != rows.true_labels
    assert 0.01 < flipped.mean() < 0.06  # 3% requested
    dups = np.flatnonzero(rows.duplicate_of >= 0)
    assert (rows.sources[dups] == "synthetic").all()
    assert 0.05 < len(dups) / 2600 < 0.15  # 10% of synthetic rows requested
    parents = rows.duplicate_of[dups]
    assert (parents < dups).all() and (rows.duplicate_of[parents] == -1).all()
    # A near-duplicate differs from its parent by noise only: much closer than a random
    # same-class row.
    img = rows.images.astype(float)
    dup_dist = np.abs(img[dups] - img[parents]).mean()
    rng = np.random.default_rng(0)
    same_class = [rng.choice(np.flatnonzero(rows.true_labels == rows.true_labels[i])) for i in dups]
    assert dup_dist < 0.6 * np.abs(img[dups] - img[same_class]).mean()


def test_classes_carry_signal_and_difficulty_hurts(rows):
    """Nearest class centroid (fit on real rows) beats chance, and more so on easy rows."""
    x = rows.images.reshape(SPEC.n_rows, -1).astype(float) / 255
    real = rows.sources == "real"
    centroids = np.stack([x[real & (rows.true_labels == c)].mean(0) for c in range(5)])
    pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    correct = pred == rows.true_labels
    assert correct.mean() > 0.5  # chance is 0.2
    easy = rows.difficulty < np.quantile(rows.difficulty, 0.3)
    hard = rows.difficulty > np.quantile(rows.difficulty, 0.7)
    assert correct[easy].mean() > correct[hard].mean() + 0.05


def test_bad_spec_and_range():
    with pytest.raises(ValueError, match=r"image_size must be an integer in \[8, 1024\]"):
        DemoPoolSpec(image_size=4)
    with pytest.raises(ValueError, match="at least one row"):
        DemoPoolSpec(n_real=0, n_synthetic=0)
    with pytest.raises(ValueError, match="outside the pool"):
        generate_rows(SPEC, SPEC.n_rows - 2, 5)


def test_test_split_is_clean_disjoint_and_from_the_same_classes(rows):
    from rayprune.data.demo_pool import generate_test_rows

    test = generate_test_rows(SPEC, 1200)
    np.testing.assert_array_equal(test.ids, np.arange(SPEC.n_rows, SPEC.n_rows + 1200))
    assert (test.labels == test.true_labels).all() and (test.duplicate_of == -1).all()
    assert (test.sources == "real").all()
    np.testing.assert_array_equal(generate_test_rows(SPEC, 300).images, test.images[:300])
    # Same class model as the pool: centroids fit on the pool classify the test split.
    x = rows.images.reshape(SPEC.n_rows, -1).astype(float)
    centroids = np.stack([x[rows.true_labels == c].mean(0) for c in range(5)])
    xt = test.images.reshape(len(test.ids), -1).astype(float)
    pred = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.labels).mean() > 0.5


def test_distractor_label_noise_flips_to_the_class_mixed_into_the_image(rows):
    """The same pool with ``distractor`` noise: identical images and flip pattern, and every
    flipped label is the image's distractor class, never its own."""
    import dataclasses

    other = generate_rows(dataclasses.replace(SPEC, label_noise_kind="distractor"))
    np.testing.assert_array_equal(other.images, rows.images)
    flipped = rows.labels != rows.true_labels
    np.testing.assert_array_equal(other.labels != other.true_labels, flipped)
    np.testing.assert_array_equal(other.labels[flipped], other.distractors[flipped])
    np.testing.assert_array_equal(other.labels[~flipped], rows.labels[~flipped])
    assert (other.distractors != other.true_labels).all()
    # Uniform flips spread over the other classes; these all land on the distractor.
    assert (rows.labels[flipped] != rows.distractors[flipped]).mean() > 0.5


def test_label_noise_kind_is_checked():
    from rayprune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"pool\.demo\.label_noise_kind.*uniform, distractor.*'pair'"):
        load_config(None, {"pool.demo.label_noise_kind": "pair"})
