"""Exact nearest-centroid search: FAISS (float32) proposes, float64 decides."""

from __future__ import annotations

import numpy as np

ASSIGN_CHUNK_ROWS = 4096


def flat_index(centroids: np.ndarray):
    """An exact (flat, L2) FAISS index over ``centroids`` [k, d] (stored as float32)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest_prototypes(index, centroids: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centroid of each row of standardized ``features`` [n, d] (float64).

    FAISS (float32, exhaustive) proposes the two nearest centroids. Where their float32 squared
    distances differ by less than the float32 rounding bound (``float32_distance_tolerance``), the
    float64 distances to both decide (ties go to the lower index); the returned distance is always
    the float64 Euclidean distance (not squared, standardized units). Returns (local centroid index
    [n] int64, distance [n] float64); rows that are not finite get -1 and inf.
    """
    n, d = features.shape
    best_id = np.empty(n, dtype=np.int64)
    best_d2 = np.empty(n)
    n_candidates = min(2, index.ntotal)
    largest_norm = float(np.sqrt(np.max(np.einsum("ij,ij->i", centroids, centroids))))
    for start in range(0, n, ASSIGN_CHUNK_ROWS):
        rows = features[start:start + ASSIGN_CHUNK_ROWS]
        d2_float32, candidates = index.search(np.ascontiguousarray(rows, dtype=np.float32), n_candidates)
        chosen = candidates[:, 0]
        d2 = _squared_distances(rows, centroids, chosen)
        if n_candidates == 2:
            tolerance = float32_distance_tolerance(d2_float32[:, 1], largest_norm, d)
            close = np.flatnonzero(d2_float32[:, 1] - d2_float32[:, 0] <= tolerance)
            second = candidates[close, 1]
            d2_second = _squared_distances(rows[close], centroids, second)
            better = (second >= 0) & ((d2_second < d2[close]) | ((d2_second == d2[close]) & (second < chosen[close])))
            chosen[close[better]] = second[better]
            d2[close[better]] = d2_second[better]
        invalid = (chosen < 0) | ~np.isfinite(d2)
        chosen[invalid], d2[invalid] = -1, np.inf
        best_id[start:start + len(rows)] = chosen
        best_d2[start:start + len(rows)] = d2
    return best_id, np.sqrt(best_d2)


def float32_distance_tolerance(d2_float32: np.ndarray, largest_centroid_norm: float, d: int) -> np.ndarray:
    """Bound on the rounding error of FAISS's float32 squared distances ||x - c||^2 ([n]).

    FAISS evaluates ||x||^2 + ||c||^2 - 2 x.c in float32; each term's error is below
    (d + 8) eps32 (||x||^2 + ||c||^2), and ||x|| <= ||x - c|| + ||c|| bounds the unknown ||x||.
    """
    eps = float(np.finfo(np.float32).eps)
    x_norm = np.sqrt(np.maximum(d2_float32, 0)) + largest_centroid_norm
    return (d + 8) * eps * (x_norm ** 2 + largest_centroid_norm ** 2)


def _squared_distances(rows: np.ndarray, centroids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Float64 ||rows[i] - centroids[ids[i]]||^2 ([n])."""
    difference = centroids.take(ids, axis=0)
    np.subtract(rows, difference, out=difference)
    return np.einsum("ij,ij->i", difference, difference)
