"""A deterministic, class-conditional demo pool with structure worth pruning.

No downloads: every image is drawn from a per-class generative model built from the
seed. Each class has a prototype (an oriented colour grating plus a coloured blob);
a sample mixes its class prototype with another class's by a per-sample *difficulty*,
adds noise, and is randomly shifted. On top of that:

* the ``real`` part (rows ``0..n_real-1``) is clean; the larger ``synthetic`` part is
  generated with a small colour cast and more noise, like a generator's images;
* a fraction of synthetic rows are near-duplicates of an earlier row of the same block;
* a small fraction of labels are flipped (label noise): to any other class (``uniform``),
  or to the class mixed into the image (``distractor``: the label a class-conditional
  generator gets wrong on an ambiguous image, and noise that misleads a model, where
  uniform flips largely cancel out).

Rows are generated in fixed blocks seeded by ``(seed, block)``, so any row range gives
identical rows however the pool is chunked, and pools of millions of rows can be
written block by block. The hidden truth (difficulty, flipped label, duplicate parent)
comes with every block so tests and benchmarks can check what scores find.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from rayprune.bounds import COUNT_MAX, bounded, check_ranges, one_of, seed_field
from rayprune.validation import check_positive_int

BLOCK_ROWS = 1024
SOURCES = ("real", "synthetic")


@dataclass(frozen=True)
class DemoPoolSpec:
    """Size and character of a demo pool."""

    n_real: int = bounded(1000, ge=0, le=COUNT_MAX)
    n_synthetic: int = bounded(4000, ge=0, le=COUNT_MAX)
    image_size: int = bounded(16, ge=8, le=1024)
    num_classes: int = bounded(10, ge=2, le=10_000)
    seed: int = seed_field()
    label_noise: float = bounded(0.03, ge=0, lt=1)
    label_noise_kind: str = one_of("uniform", ("uniform", "distractor"))
    duplicate_fraction: float = bounded(0.1, ge=0, lt=1)
    noise_std: float = bounded(0.08, ge=0, le=1)

    def __post_init__(self) -> None:
        check_ranges(self, "pool.demo")
        if self.n_real + self.n_synthetic == 0:
            raise ValueError("pool.demo.n_real and pool.demo.n_synthetic must give at least one row; got 0 and 0")

    @property
    def n_rows(self) -> int:
        return self.n_real + self.n_synthetic


@dataclass(frozen=True)
class DemoRows:
    """A range of demo rows: the pool columns plus the hidden truth."""

    ids: np.ndarray  # int64
    images: np.ndarray  # uint8 (n, H, W, 3)
    labels: np.ndarray  # int64, possibly flipped
    sources: np.ndarray  # object array of "real" / "synthetic"
    true_labels: np.ndarray  # int64, before label noise
    distractors: np.ndarray  # int64, the other class mixed into each image
    difficulty: np.ndarray  # float32 in [0, 1): mixing weight of the distractor class
    duplicate_of: np.ndarray  # int64 id of the near-duplicate's parent, -1 if none


def _class_prototypes(spec: DemoPoolSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 0x5EED])
    c = spec.num_classes
    return {
        "angle": rng.permutation(c) * np.pi / c + rng.uniform(0, np.pi / (2 * c), c),
        "freq": rng.uniform(0.6, 1.6, c) * 2 * np.pi / spec.image_size * 2,
        "grating_rgb": rng.uniform(0.2, 1.0, (c, 3)),
        "blob_rgb": rng.uniform(0.0, 1.0, (c, 3)),
        "blob_xy": rng.uniform(0.25, 0.75, (c, 2)) * spec.image_size,
    }


def _render(spec: DemoPoolSpec, protos: dict, cls: np.ndarray, phase, shift, scale) -> np.ndarray:
    """Render prototypes of classes ``cls`` as float images in [0, 1], (n, H, W, 3)."""
    s = spec.image_size
    yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    xx = xx[None] - shift[:, 0, None, None]
    yy = yy[None] - shift[:, 1, None, None]
    angle = protos["angle"][cls][:, None, None]
    wave = np.cos(protos["freq"][cls][:, None, None] * (xx * np.cos(angle) + yy * np.sin(angle)) + phase[:, None, None])
    grating = 0.5 + 0.5 * wave[..., None] * protos["grating_rgb"][cls][:, None, None, :]
    bx = protos["blob_xy"][cls][:, 0, None, None]
    by = protos["blob_xy"][cls][:, 1, None, None]
    blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * (scale[:, None, None] * s / 6) ** 2))[..., None]
    return (1 - 0.7 * blob) * grating * 0.8 + 0.7 * blob * protos["blob_rgb"][cls][:, None, None, :]


TEST_STREAM = 1 << 20  # block seeds of the test split start here (disjoint from the pool's)


def _block(spec: DemoPoolSpec, protos: dict, block: int, test: bool = False) -> DemoRows:
    """Generate one whole block of rows (deterministic in (seed, block)).

    ``test``: a block of the test split: same classes, fresh draws, all clean "real"
    samples (no label noise, no near-duplicates), ids counting on from the pool's.
    """
    start = block * BLOCK_ROWS
    if test:
        ids = np.arange(start, start + BLOCK_ROWS, dtype=np.int64) + spec.n_rows
        spec = dataclasses.replace(spec, label_noise=0.0, duplicate_fraction=0.0)
    else:
        ids = np.arange(start, min(start + BLOCK_ROWS, spec.n_rows), dtype=np.int64)
    n = len(ids)
    rng = np.random.default_rng([spec.seed, block + (TEST_STREAM if test else 0)])
    c = spec.num_classes
    true = rng.integers(0, c, n)
    other = (true + rng.integers(1, c, n)) % c
    # Most samples easy, a tail of hard ones: Beta(1.2, 4) has mean ~0.23.
    difficulty = rng.beta(1.2, 4.0, n) * 0.95
    synthetic = (ids >= spec.n_real) if not test else np.zeros(n, dtype=bool)
    phase = rng.uniform(0, 2 * np.pi, n)
    shift = rng.normal(0, spec.image_size / 10, (n, 2))
    scale = rng.uniform(0.7, 1.3, n)
    # Near-duplicates: a synthetic row copies the draws of an earlier row of its block.
    parent_pos = np.full(n, -1)
    is_dup = synthetic & (rng.random(n) < spec.duplicate_fraction) & (np.arange(n) > 0)
    for i in np.flatnonzero(is_dup):
        parent_pos[i] = rng.integers(0, i)
        p = parent_pos[i]
        while parent_pos[p] >= 0:  # point at the original, not a copy of a copy
            p = parent_pos[p]
        parent_pos[i] = p
        true[i], other[i], difficulty[i] = true[p], other[p], difficulty[p]
        phase[i], shift[i], scale[i] = phase[p], shift[p], scale[p]
    mixed = (1 - difficulty)[:, None, None, None] * _render(spec, protos, true, phase, shift, scale)
    mixed += difficulty[:, None, None, None] * _render(spec, protos, other, phase + 1.0, -shift, scale)
    noise_std = np.where(synthetic, spec.noise_std * 1.5, spec.noise_std)[:, None, None, None]
    noise = rng.normal(0, 1, mixed.shape)
    dups = np.flatnonzero(parent_pos >= 0)
    # A near-duplicate shares its parent's noise too, plus a little of its own.
    noise[dups] = noise[parent_pos[dups]] + 0.25 * noise[dups]
    images = mixed + noise * noise_std
    images[synthetic] = images[synthetic] * 0.92 + np.array([0.06, 0.03, 0.0])  # generator colour cast
    labels = true.copy()
    flip = rng.random(n) < spec.label_noise
    labels[flip] = (true[flip] + rng.integers(1, c, int(flip.sum()))) % c  # drawn for both kinds: same stream
    if spec.label_noise_kind == "distractor":
        labels[flip] = other[flip]
    duplicate_of = np.where(parent_pos >= 0, ids[0] + parent_pos, -1).astype(np.int64)
    return DemoRows(
        ids=ids,
        images=np.clip(np.rint(images * 255), 0, 255).astype(np.uint8),
        labels=labels.astype(np.int64),
        sources=np.where(synthetic, SOURCES[1], SOURCES[0]).astype(object),
        true_labels=true.astype(np.int64),
        distractors=other.astype(np.int64),
        difficulty=difficulty.astype(np.float32),
        duplicate_of=duplicate_of,
    )


def generate_rows(spec: DemoPoolSpec, start: int = 0, count: int | None = None) -> DemoRows:
    """Rows ``start .. start+count-1`` of the pool (all rows by default)."""
    count = spec.n_rows - start if count is None else count
    if start < 0 or start + count > spec.n_rows:
        raise ValueError(f"rows [{start}, {start + count}) fall outside the pool of {spec.n_rows} rows")
    check_positive_int(count, "count")
    protos = _class_prototypes(spec)
    blocks = [_block(spec, protos, b) for b in range(start // BLOCK_ROWS, (start + count - 1) // BLOCK_ROWS + 1)]
    offset = start - (start // BLOCK_ROWS) * BLOCK_ROWS
    take = slice(offset, offset + count)
    return DemoRows(**{f: np.concatenate([getattr(b, f) for b in blocks])[take] for f in DemoRows.__dataclass_fields__})


def generate_test_rows(spec: DemoPoolSpec, count: int) -> DemoRows:
    """A held-out test split of ``count`` clean samples from the pool's class model.

    Ids follow the pool's (``n_rows .. n_rows+count-1``), so they never collide with it.
    """
    check_positive_int(count, "count")
    protos = _class_prototypes(spec)
    blocks = [_block(spec, protos, b, test=True) for b in range((count - 1) // BLOCK_ROWS + 1)]
    return DemoRows(**{f: np.concatenate([getattr(b, f) for b in blocks])[:count]
                       for f in DemoRows.__dataclass_fields__})
