"""k-nearest-neighbour search between query and reference embeddings.

Three paths with one signature:

* ``exact``: blocked brute force in PyTorch. Squared distances come from one matrix
  multiply per (query block, reference block) pair and a running top-k is merged across
  reference blocks, so memory is bounded by one distance block (``DISTANCE_BLOCK``
  floats, or one row of a reference block if that is larger) plus one transposed copy
  of the references, whatever the number of queries; no ``queries x references x dims``
  tensor is ever built. Within a block the top-k is
  found through group minima (see ``_block_topk``), which costs far less than a top-k
  over every distance. The returned distances are recomputed directly from the chosen
  pairs, so they carry no cancellation error from the matrix-multiply expansion.
* ``approx``: a faiss HNSW graph for reference sets too large for exact search;
* ``ivf``: faiss IVF-Flat (k-means lists, a few probed per query), faster than HNSW at
  the same recall on clustered embeddings; queries it finds too few neighbours for are
  searched exactly.

Distances are Euclidean; with ``metric="cosine"`` both sides are L2-normalised first
(Euclidean order on the unit sphere equals cosine order) and cosine distance
``1 - cos`` is returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from rayprune.choices import METHODS, METRICS
from rayprune.validation import as_finite_array, check_choice, check_positive_int

if TYPE_CHECKING:  # imported where exact search runs: the preflight imports this module's options
    import torch


@dataclass(frozen=True)
class SearchConfig:
    """How to search: metric, method and the memory/accuracy knobs of each method."""

    metric: str = "euclidean"
    method: str = "exact"
    # Upper bounds: query blocks also stop at DISTANCE_BLOCK floats of distances. One
    # reference block per 64k references saves merges (measured on 2 cores, 128 dims).
    query_block: int = 8192
    reference_block: int = 65536
    # HNSW: ef_search 32 keeps recall@12 near 0.98 on hard (isotropic, 128-d) data at
    # 3-4x the search speed of ef_search 128 (recall 0.9999); benchmarks/neighbours.py.
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 32
    # IVF-Flat: ivf_lists 0 means about sqrt(references) lists (faiss wants >= 39 training
    # points a list). 4 probes of 224 lists: recall@12 0.991 at 5.3x exact on the
    # benchmark's 50k x 128-d references (2 cores).
    ivf_lists: int = 0
    ivf_probes: int = 4

    def __post_init__(self) -> None:
        check_choice(self.metric, "metric", METRICS)
        check_choice(self.method, "method", METHODS)
        for name in ("query_block", "reference_block", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "ivf_probes"):
            check_positive_int(getattr(self, name), name)
        if not isinstance(self.ivf_lists, int) or self.ivf_lists < 0:
            raise ValueError(f"ivf_lists must be an integer >= 0 (0: about sqrt of the references); "
                             f"got {self.ivf_lists!r}")


def _embeddings(values, name: str) -> np.ndarray:
    arr = as_finite_array(values, name, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (samples, dims) with dims >= 1; got shape {arr.shape}")
    return arr


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


#: Largest number of references whose minimum stands in for them in the first top-k pass.
MAX_GROUP = 16
#: Floats in one query-block x reference-block distance matrix (32 MiB). Query blocks
#: are as tall as this allows (up to ``query_block``): few large torch calls matter
#: more than cache fit once the references are few, and a busy machine makes every
#: small multi-threaded call slow.
DISTANCE_BLOCK = 2**23


@dataclass(frozen=True)
class _RefBlock:
    """One reference block, prepared once per search: transposed for the matrix multiply
    and padded to ``group x width`` columns (padding has infinite squared norm)."""

    start: int
    ref_t: torch.Tensor  # (dims, group * width)
    ref_sq: torch.Tensor  # (group * width,)
    group: int
    width: int


def _ref_blocks(references: np.ndarray, centre: np.ndarray, k: int, size: int) -> list[_RefBlock]:
    """Centre, square-norm, pad and transpose the references, ``size`` rows per block."""
    import torch

    blocks = []
    for r0 in range(0, len(references), size):
        r = torch.from_numpy(references[r0 : r0 + size] - centre)
        sq = (r * r).sum(dim=1)
        # Groups of references only pay off when there are many more groups than k.
        group = max(1, min(MAX_GROUP, len(r) // (4 * k)))
        width = -(-len(r) // group)
        pad = group * width - len(r)
        if pad:
            r = torch.cat([r, r.new_zeros(pad, r.shape[1])])
            sq = torch.cat([sq, sq.new_full((pad,), float("inf"))])
        blocks.append(_RefBlock(r0, r.T.contiguous(), sq, group, width))
    return blocks


def _block_topk(q: torch.Tensor, block: _RefBlock, k: int, buffer: torch.Tensor):
    """The ``k`` smallest ``|r|^2 - 2 q.r`` of one reference block per query (unsorted).

    ``|q|^2`` is left out: it does not change the order within a row. Columns form
    ``width`` groups of ``group`` (column ``j + m * width`` is in group ``j``); the k
    nearest references all lie in the k groups with the smallest minima (any other
    group has k group minima below its own), so only ``k x group`` candidates per query
    need a second top-k.
    """
    import torch

    d = buffer[: len(q) * block.ref_t.shape[1]].view(len(q), -1)
    torch.addmm(block.ref_sq, q, block.ref_t, alpha=-2.0, out=d)
    take = min(k, d.shape[1])
    if block.group == 1:
        values, cols = torch.topk(d, take, dim=1, largest=False, sorted=False)
        return values, cols + block.start
    minima = torch.amin(d.view(len(q), block.group, block.width), dim=1)
    groups = torch.topk(minima, take, dim=1, largest=False, sorted=False).indices
    members = torch.arange(0, block.group * block.width, block.width)
    cand = (groups.unsqueeze(2) + members).view(len(q), -1)
    values, pos = torch.topk(torch.gather(d, 1, cand), take, dim=1, largest=False, sorted=False)
    return values, torch.gather(cand, 1, pos) + block.start


def _exact_search(queries: np.ndarray, references: np.ndarray, k: int, options: SearchConfig):
    """Blocked brute-force k-NN; returns (squared distances, indices) sorted ascending."""
    import torch

    # Centring on the reference mean leaves distances unchanged and shrinks the norms,
    # which keeps the |q|^2 - 2 q.r + |r|^2 expansion well conditioned in float32.
    centre = references.mean(axis=0, dtype=np.float64).astype(np.float32)
    out_dist = np.empty((len(queries), k), dtype=np.float32)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    with torch.inference_mode():
        blocks = _ref_blocks(references, centre, k, options.reference_block)
        width = max(b.ref_t.shape[1] for b in blocks)
        rows = max(1, min(options.query_block, len(queries), DISTANCE_BLOCK // width))
        buffer = torch.empty(rows * width)
        for q0 in range(0, len(queries), rows):
            q = torch.from_numpy(queries[q0 : q0 + rows] - centre)
            best_d, best_i = _block_topk(q, blocks[0], k, buffer)
            for block in blocks[1:]:
                values, idx = _block_topk(q, block, k, buffer)
                cand_d, cand_i = torch.cat([best_d, values], dim=1), torch.cat([best_i, idx], dim=1)
                best_d, pos = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=False)
                best_i = torch.gather(cand_i, 1, pos)
            # Exact distances for the chosen pairs (k per query: cheap), then sort so ties
            # broken by rounding in the expansion cannot leave the order wrong.
            diff = q.unsqueeze(1) - torch.from_numpy(references[best_i.numpy()] - centre)
            exact = (diff * diff).sum(dim=2)
            exact, order = torch.sort(exact, dim=1, stable=True)
            out_dist[q0 : q0 + len(q)] = exact.numpy()
            out_idx[q0 : q0 + len(q)] = torch.gather(best_i, 1, order).numpy()
    return out_dist, out_idx


def hnsw_index(references: np.ndarray, options: SearchConfig, k: int):
    """The faiss HNSW index the ``approx`` path searches, built over float32 ``references``
    as ``options`` say (euclidean; normalise first for cosine). Building it is most of an
    approx search's cost, so callers that search one reference set often can keep it."""
    import faiss  # imported lazily: only this path needs it

    index = faiss.IndexHNSWFlat(references.shape[1], options.hnsw_m)
    index.hnsw.efConstruction = options.hnsw_ef_construction
    index.add(np.ascontiguousarray(references, dtype=np.float32))
    set_search_width(index, options, k)
    return index


def set_search_width(index, options: SearchConfig, k: int) -> None:
    """Set the search-time width of a faiss index (HNSW efSearch, IVF nprobe) from ``options``.

    Width does not change the index itself, so an index built once serves every width
    (calibration tries several on one index)."""
    if hasattr(index, "nprobe"):
        index.nprobe = min(options.ivf_probes, index.nlist)
    else:
        index.hnsw.efSearch = max(options.hnsw_ef_search, k)


def ivf_lists(n_references: int, options: SearchConfig) -> int:
    """Lists of the ``ivf`` index: ``options.ivf_lists``, or about sqrt(n), at most n / 39."""
    wanted = options.ivf_lists or round(math.sqrt(n_references))
    return max(1, min(wanted, n_references // 39 or 1, n_references))


def ivf_index(references: np.ndarray, options: SearchConfig):
    """The faiss IVF-Flat index the ``ivf`` path searches: k-means lists over float32
    ``references`` (faiss's fixed seed, so the same references give the same lists)."""
    import faiss

    refs = np.ascontiguousarray(references, dtype=np.float32)
    lists = ivf_lists(len(refs), options)
    quantizer = faiss.IndexFlatL2(refs.shape[1])
    index = faiss.IndexIVFFlat(quantizer, refs.shape[1], lists)
    index.train(refs)
    index.add(refs)
    set_search_width(index, options, 0)
    return index


def approx_index(references: np.ndarray, options: SearchConfig, k: int):
    """The faiss index of ``options.method`` (``approx``: HNSW, ``ivf``: IVF-Flat)."""
    return ivf_index(references, options) if options.method == "ivf" else hnsw_index(references, options, k)


def _approx_search(queries: np.ndarray, references: np.ndarray, k: int, options: SearchConfig, index=None):
    """faiss k-NN (HNSW or IVF); returns (squared distances, indices) sorted ascending.

    Queries for which the index found fewer than k neighbours (IVF probes whose lists
    hold fewer than k references) are searched exactly instead.
    """
    index = index if index is not None else approx_index(references, options, k)
    set_search_width(index, options, k)
    dist, idx = index.search(np.ascontiguousarray(queries), k)
    dist, idx = dist.astype(np.float32), idx.astype(np.int64)
    short = np.flatnonzero((idx < 0).any(axis=1))
    if short.size:
        dist[short], idx[short] = _exact_search(queries[short], references, k, options)
    return dist, idx


def knn_search(
    queries,
    references,
    k: int,
    options: SearchConfig = SearchConfig(),
    *,
    query_labels=None,
    reference_labels=None,
    index_cache: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(distances, indices)`` of the ``k`` nearest references of every query.

    Both arrays are ``(len(queries), k)``, nearest first; indices point into
    ``references``. With labels given, each query only sees references of its own
    label. Distances are Euclidean, or ``1 - cos`` for ``metric="cosine"``.

    ``index_cache``: a dict the caller keeps across calls with the *same* references
    (e.g. an actor scoring batch after batch); the ``approx`` and ``ivf`` paths store their
    faiss indexes there instead of rebuilding them per call. Ignored by ``exact``.
    """
    k = check_positive_int(k, "k")
    q = _embeddings(queries, "queries")
    r = _embeddings(references, "references")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references must have the same dims; got {q.shape[1]} and {r.shape[1]}")
    if (query_labels is None) != (reference_labels is None):
        raise ValueError("query_labels and reference_labels must be given together (same-label search) or not at all")
    if options.metric == "cosine":
        q, r = _unit(q), _unit(r)
    def search(queries, refs, key):
        if options.method == "exact":
            return _exact_search(queries, refs, k, options)
        if index_cache is None:
            return _approx_search(queries, refs, k, options)
        # The search width is set per search: one cached index serves every width.
        key = (key, k, replace(options, hnsw_ef_search=1, ivf_probes=1))
        if key not in index_cache:
            index_cache[key] = approx_index(refs, options, k)
        return _approx_search(queries, refs, k, options, index_cache[key])

    if query_labels is None:
        if k > len(r):
            raise ValueError(f"k must not exceed the number of references ({len(r)}); got k={k}")
        sq_dist, idx = search(q, r, None) if len(q) else _empty(k)
    else:
        q_lab, r_lab = np.asarray(query_labels), np.asarray(reference_labels)
        if q_lab.shape != (len(q),) or r_lab.shape != (len(r),):
            raise ValueError(
                f"query_labels must have shape ({len(q)},) and reference_labels ({len(r)},); "
                f"got {q_lab.shape} and {r_lab.shape}"
            )
        sq_dist, idx = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for label in np.unique(q_lab):
            q_rows = np.flatnonzero(q_lab == label)
            r_rows = np.flatnonzero(r_lab == label)
            if k > len(r_rows):
                raise ValueError(
                    f"k={k} exceeds the {len(r_rows)} reference(s) with label {np.asarray(label).item()!r}; "
                    f"same-label search needs at least k references per label (lower k or turn same_label off)"
                )
            d, i = search(q[q_rows], r[r_rows], np.asarray(label).item())
            sq_dist[q_rows], idx[q_rows] = d, r_rows[i]
    dist = np.sqrt(np.clip(sq_dist, 0.0, None))
    if options.metric == "cosine":
        dist = dist * dist / 2.0  # |a-b|^2 = 2 - 2cos for unit vectors
    return dist, idx


def _empty(k: int):
    return np.empty((0, k), np.float32), np.empty((0, k), np.int64)


# ------------------------------------------------------------------ search width calibration

#: Widths tried in turn until the recall target is met (HNSW efSearch; IVF nprobe, capped
#: at the number of lists, where IVF becomes exhaustive).
#: An approximate search must beat exact search on the calibration sample by this much
#: (a margin for timing noise) or exact search is used.
MIN_SPEEDUP = 1.25
HNSW_EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
IVF_PROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of the share of the true ``k`` neighbours that were found."""
    if found.shape != truth.shape:
        raise ValueError(f"found and truth must have the same shape; got {found.shape} and {truth.shape}")
    if found.size == 0:
        return 1.0
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum()
    return float(hits / truth.size)


@dataclass(frozen=True)
class Calibration:
    """The search options chosen for a recall target and what was measured on the way.

    ``options``: the narrowest setting that reaches the target (``method`` becomes
    ``exact`` when none does, or when exact search was faster at that width);
    ``recall``: its recall@k on the sample; ``tried``: (width, recall) for every width
    tried, in order; ``speedup``: the sample's exact search time over the chosen
    width's (measured, so it varies from run to run); ``note``: why exact was chosen.
    """

    options: SearchConfig
    recall: float
    sample: int
    tried: list[tuple[int, float]] = field(default_factory=list)
    speedup: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        width = {"approx": self.options.hnsw_ef_search, "ivf": self.options.ivf_probes}.get(self.options.method)
        return {"method": self.options.method, "search_width": width, "recall": self.recall,
                "sample": self.sample, "tried": [list(t) for t in self.tried], "speedup_on_sample": self.speedup,
                "note": self.note}


def calibrate_search(queries, references, k: int, options: SearchConfig, min_recall: float, *,
                     query_labels=None, reference_labels=None, self_index=None) -> Calibration:
    """The narrowest search width of ``options.method`` whose recall@k on ``queries`` reaches ``min_recall``.

    The exact neighbours of the sample are the truth. ``self_index``: when the queries
    are themselves references, the position of each in ``references``; the query's own
    match is left out on both sides (k+1 are searched), so recall measures the
    neighbours a query that is *not* a reference would get. An ``exact`` method, no width
    reaching the target, or a width whose search is not ``MIN_SPEEDUP`` times faster
    than exact search on the sample (high-dimensional embeddings without structure need
    so wide a search that scanning everything is cheaper) gives exact search (recall 1).
    """
    if not 0.0 < min_recall <= 1.0:
        raise ValueError(f"min_recall must be in (0, 1]; got {min_recall!r}")
    exact = replace(options, method="exact")
    n = len(queries)
    if options.method == "exact" or n == 0:
        return Calibration(exact, 1.0, n)
    extra = 0 if self_index is None else 1
    labels = {"query_labels": query_labels, "reference_labels": reference_labels}

    def neighbours(opts, cache=None):
        _, idx = knn_search(queries, references, k + extra, opts, index_cache=cache, **labels)
        if self_index is None:
            return idx
        own = idx == np.asarray(self_index)[:, None]
        # Drop the query's own row where it was found, else the farthest neighbour.
        drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(n), drop] = False
        return idx[keep].reshape(n, k)

    start = time.perf_counter()
    truth = neighbours(exact)
    exact_seconds = time.perf_counter() - start
    cache: dict = {}
    ladder = HNSW_EF_LADDER if options.method == "approx" else IVF_PROBE_LADDER
    tried = []
    for width in ladder:
        trial = (replace(options, hnsw_ef_search=width) if options.method == "approx"
                 else replace(options, ivf_probes=width))
        recall = recall_at_k(neighbours(trial, cache), truth)
        tried.append((width, recall))
        if recall >= min_recall:
            start = time.perf_counter()  # timed again: the first search at a width may have built the index
            neighbours(trial, cache)
            speedup = exact_seconds / max(time.perf_counter() - start, 1e-9)
            if speedup < MIN_SPEEDUP:
                return Calibration(exact, 1.0, n, tried, speedup,
                                   f"recall {recall:.3f} needs width {width}, where exact search was faster "
                                   f"({speedup:.2f}x on the sample)")
            return Calibration(trial, recall, n, tried, speedup)
        if options.method == "ivf" and width >= ivf_lists(len(references), options):
            break  # every list probed: wider cannot help
    return Calibration(exact, 1.0, n, tried, None, f"no search width reached recall {min_recall}")
