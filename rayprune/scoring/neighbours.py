"""k-nearest-neighbour search between query and reference embeddings.

Two paths with one signature:

* ``exact``: blocked brute force in PyTorch. Squared distances come from one matrix
  multiply per (query block, reference block) pair and a running top-k is merged across
  reference blocks, so memory is bounded by ``query_block x (reference_block + k)``
  floats whatever the number of queries, and no ``queries x references x dims`` tensor
  is ever built. The returned distances are recomputed directly from the chosen pairs,
  so they carry no cancellation error from the matrix-multiply expansion.
* ``approx``: a faiss HNSW graph for reference sets too large for exact search.

Distances are Euclidean; with ``metric="cosine"`` both sides are L2-normalised first
(Euclidean order on the unit sphere equals cosine order) and cosine distance
``1 - cos`` is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rayprune.validation import as_finite_array, check_choice, check_positive_int

METRICS = ("euclidean", "cosine")
METHODS = ("exact", "approx")


@dataclass(frozen=True)
class SearchOptions:
    """How to search: metric, method and the memory/accuracy knobs of each method."""

    metric: str = "euclidean"
    method: str = "exact"
    query_block: int = 2048
    reference_block: int = 16384
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128

    def __post_init__(self) -> None:
        check_choice(self.metric, "metric", METRICS)
        check_choice(self.method, "method", METHODS)
        for name in ("query_block", "reference_block", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            check_positive_int(getattr(self, name), name)


def _embeddings(values, name: str) -> np.ndarray:
    arr = as_finite_array(values, name, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (samples, dims) with dims >= 1; got shape {arr.shape}")
    return arr


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _exact_search(queries: np.ndarray, references: np.ndarray, k: int, options: SearchOptions):
    """Blocked brute-force k-NN; returns (squared distances, indices) sorted ascending."""
    # Centring on the reference mean leaves distances unchanged and shrinks the norms,
    # which keeps the |q|^2 - 2 q.r + |r|^2 expansion well conditioned in float32.
    centre = references.mean(axis=0, dtype=np.float64).astype(np.float32)
    refs = torch.from_numpy(references - centre)
    ref_sq = (refs * refs).sum(dim=1)
    out_dist = np.empty((len(queries), k), dtype=np.float32)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    with torch.inference_mode():
        for q0 in range(0, len(queries), options.query_block):
            q = torch.from_numpy(queries[q0 : q0 + options.query_block] - centre)
            q_sq = (q * q).sum(dim=1, keepdim=True)
            best_d = torch.full((len(q), 0), float("inf"))
            best_i = torch.empty((len(q), 0), dtype=torch.int64)
            for r0 in range(0, len(refs), options.reference_block):
                r = refs[r0 : r0 + options.reference_block]
                d = torch.addmm(q_sq + ref_sq[r0 : r0 + len(r)], q, r.T, alpha=-2.0)
                cand_d = torch.cat([best_d, d], dim=1)
                cand_i = torch.cat([best_i, torch.arange(r0, r0 + len(r)).expand(len(q), -1)], dim=1)
                take = min(k, cand_d.shape[1])
                best_d, pos = torch.topk(cand_d, take, dim=1, largest=False, sorted=True)
                best_i = torch.gather(cand_i, 1, pos)
            # Exact distances for the chosen pairs (k per query: cheap), then re-sort so
            # ties broken by rounding in the expansion cannot leave the order wrong.
            diff = q.unsqueeze(1) - refs[best_i]
            exact = (diff * diff).sum(dim=2)
            exact, order = torch.sort(exact, dim=1, stable=True)
            out_dist[q0 : q0 + len(q)] = exact.numpy()
            out_idx[q0 : q0 + len(q)] = torch.gather(best_i, 1, order).numpy()
    return out_dist, out_idx


def _approx_search(queries: np.ndarray, references: np.ndarray, k: int, options: SearchOptions):
    """faiss HNSW k-NN; returns (squared distances, indices) sorted ascending."""
    import faiss  # imported lazily: only this path needs it

    index = faiss.IndexHNSWFlat(references.shape[1], options.hnsw_m)
    index.hnsw.efConstruction = options.hnsw_ef_construction
    index.hnsw.efSearch = max(options.hnsw_ef_search, k)
    index.add(np.ascontiguousarray(references))
    dist, idx = index.search(np.ascontiguousarray(queries), k)
    return dist.astype(np.float32), idx.astype(np.int64)


def knn_search(
    queries,
    references,
    k: int,
    options: SearchOptions = SearchOptions(),
    *,
    query_labels=None,
    reference_labels=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(distances, indices)`` of the ``k`` nearest references of every query.

    Both arrays are ``(len(queries), k)``, nearest first; indices point into
    ``references``. With labels given, each query only sees references of its own
    label. Distances are Euclidean, or ``1 - cos`` for ``metric="cosine"``.
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
    search = _exact_search if options.method == "exact" else _approx_search

    if query_labels is None:
        if k > len(r):
            raise ValueError(f"k must not exceed the number of references ({len(r)}); got k={k}")
        sq_dist, idx = search(q, r, k, options) if len(q) else _empty(k)
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
            d, i = search(q[q_rows], r[r_rows], k, options)
            sq_dist[q_rows], idx[q_rows] = d, r_rows[i]
    dist = np.sqrt(np.clip(sq_dist, 0.0, None))
    if options.metric == "cosine":
        dist = dist * dist / 2.0  # |a-b|^2 = 2 - 2cos for unit vectors
    return dist, idx


def _empty(k: int):
    return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
