"""Clustering one element's standardized atoms: FAISS k-means, the K criterion, exact memberships, statistics.

The information criterion reads a k-means partition as a hard-assignment mixture of Gaussians
sharing one diagonal variance (``kmeans_information_criteria``). Membership is always the exact
nearest centroid (``nearest_prototypes``), the same search that ``assign`` runs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from protoalign_cli.prototypes.search import ASSIGN_CHUNK_ROWS, flat_index, nearest_prototypes

RADIUS_PERCENTILE = 95.0
# k-means trains on at most this many distinct atoms per centroid (a seeded uniform subsample of the
# distinct rows, weighted by multiplicity; FAISS's own default cap). Memberships and statistics
# always use every atom.
TRAIN_POINTS_PER_CENTROID = 256


# ----------------------------------------------------------------------------- pure functions


def unique_rows(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a 2-D array (compared bit for bit, in a fixed order) and how often each occurs."""
    points = np.ascontiguousarray(points)
    as_bytes = points.view(np.dtype((np.void, points.dtype.itemsize * points.shape[1]))).ravel()
    _, first, counts = np.unique(as_bytes, return_index=True, return_counts=True)
    return points[first], counts


def kmeans_information_criteria(sse_per_feature: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    """BIC and AIC (lower is better) of a k-means partition of n points in d features.

    The partition is read as a hard-assignment mixture of K Gaussians N(mu_k, diag(s2)) that share one
    diagonal variance. With K non-empty clusters of sizes n_k and per-feature within-cluster sums of
    squared deviations SSE_j, the maximum-likelihood variances are s2_j = SSE_j / n and

        log L = sum_k n_k ln(n_k / n) - (n / 2) sum_j ln(2 pi s2_j) - n d / 2,
        p     = K d (means) + d (variances) + K - 1 (mixing weights),
        BIC   = -2 log L + p ln n,        AIC = -2 log L + 2 p.

    Rescaling a feature shifts log L by the same amount for every partition, so the choice of K
    does not depend on the units of the features. s2_j is floored at the smallest positive float.
    """
    sse_per_feature = np.asarray(sse_per_feature, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    sizes = sizes[sizes > 0]
    n, k, d = sizes.sum(), len(sizes), len(sse_per_feature)
    variance = np.maximum(sse_per_feature / n, np.finfo(np.float64).tiny)
    log_likelihood = float(np.sum(sizes * np.log(sizes / n)) - 0.5 * n * np.sum(np.log(2 * np.pi * variance)) - 0.5 * n * d)
    n_parameters = k * d + d + (k - 1)
    return {
        "log_likelihood": log_likelihood,
        "bic": -2 * log_likelihood + n_parameters * np.log(n),
        "aic": -2 * log_likelihood + 2 * n_parameters,
    }


def within_cluster_sse(features: np.ndarray, centroid: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Per-feature sum over points of (feature - own centroid)^2 ([d]); ``cluster`` [n] indexes ``centroid``."""
    sse = np.zeros(features.shape[1])
    for start in range(0, len(features), ASSIGN_CHUNK_ROWS):
        stop = start + ASSIGN_CHUNK_ROWS
        difference = features[start:stop] - centroid[cluster[start:stop]]
        sse += np.einsum("ij,ij->j", difference, difference)
    return sse


def member_statistics(prototype_id: np.ndarray, distance: np.ndarray, energy: np.ndarray,
                      n_prototypes: int) -> dict[str, np.ndarray]:
    """Per-prototype member count, mean and (population) std of member energies (eV), and radius.

    ``prototype_id`` [n] in 0..n_prototypes-1 (every prototype must have members), ``distance`` [n]
    to the own centroid, ``energy`` [n] energy minus E0 (eV). The radius is the 95th percentile of
    the member distances (numpy's linear interpolation).
    """
    count = np.bincount(prototype_id, minlength=n_prototypes)
    if np.any(count == 0):
        raise ValueError("every prototype needs at least one member")
    energy_mean = np.bincount(prototype_id, weights=energy, minlength=n_prototypes) / count
    deviation = energy - energy_mean[prototype_id]
    energy_std = np.sqrt(np.bincount(prototype_id, weights=deviation * deviation, minlength=n_prototypes) / count)
    return {"count": count.astype(np.int64), "energy_mean": energy_mean, "energy_std": energy_std,
            "radius": member_radii(prototype_id, distance, count)}


def member_radii(prototype_id: np.ndarray, distance: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per prototype, the 95th percentile (numpy's linear interpolation) of its members' ``distance`` ([P], float64).

    ``prototype_id`` [n] in 0..P-1, ``count`` [P] its bincount (all positive).
    """
    order = np.argsort(prototype_id, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(count)])
    sorted_distance = distance[order]
    return np.array([np.percentile(np.asarray(sorted_distance[bounds[p]:bounds[p + 1]], dtype=np.float64), RADIUS_PERCENTILE)
                     for p in range(len(count))])


def single_member_count(count: np.ndarray) -> int:
    """How many prototypes have a single member (``count`` [P] members each).

    Their radius is 0 (up to the float32 rounding of the centroid): no target atom but a copy of that
    member lies within any multiple of it.
    """
    return int(np.count_nonzero(np.asarray(count) == 1))


def derived_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and keys (element, K), independent of processing order."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- FAISS


def kmeans_centroids(points: np.ndarray, weights: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> np.ndarray:
    """FAISS k-means (k-means++ start, ``niter`` Lloyd iterations) of weighted ``points`` [m, d] -> [k, d] float64."""
    import faiss

    kmeans = faiss.Kmeans(
        points.shape[1], k, niter=niter, seed=seed, gpu=bool(gpu), verbose=False,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        max_points_per_centroid=len(points) // k + 1, min_points_per_centroid=1,
    )
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32), weights=np.ascontiguousarray(weights, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float64)


def gpu_available() -> bool:
    """Whether FAISS was built with GPU support and sees a GPU."""
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


# ----------------------------------------------------------------------------- one element


@dataclasses.dataclass
class Clustering:
    """Centroids of one element (standardized units, float32 values) found on ``scaled`` atoms.

    ``local_id`` [n] and ``distance`` [n] are the exact memberships of those atoms; ``n_distinct``
    counts their distinct rows; ``curve`` holds (k, sse, bic, aic) per K tried by 'auto'.
    """

    centroid: np.ndarray
    local_id: np.ndarray
    distance: np.ndarray
    n_distinct: int
    curve: dict
    notes: list


def cluster_atoms(z: int, scaled: np.ndarray, k: int | str, k_grid: Sequence[int], criterion: str,
                  niter: int, seed: int, gpu: bool) -> Clustering:
    """Cluster the standardized atoms ``scaled`` [n, d] of element ``z`` into prototypes.

    With ``k`` = 'auto' every K of ``k_grid`` below the number of distinct atoms is tried and the one
    with the lowest ``criterion`` kept; an element with no more distinct atoms than K gets one
    prototype per distinct atom. Centroids left without members among ``scaled`` are dropped.
    """
    distinct, multiplicity = unique_rows(scaled.astype(np.float32))
    n_distinct, notes = len(distinct), []
    curve = {"k": [], "sse": [], "bic": [], "aic": []}
    if k == "auto":
        candidates = [kk for kk in k_grid if kk < n_distinct]
        if len(candidates) < len(k_grid) and candidates:
            notes.append(f"Z={z}: only {n_distinct} distinct atoms, K >= {n_distinct} left out of the grid")
    else:
        candidates = [k] if k < n_distinct else []
    if not candidates:
        smallest_k = min(k_grid) if k == "auto" else k
        notes.append(f"Z={z}: {n_distinct} distinct atoms, not more than K={smallest_k}; one prototype per distinct atom")
        centroid = distinct.astype(np.float64)
    elif k == "auto":
        centroid = _choose_k(z, distinct, multiplicity, scaled, candidates, criterion, niter, seed, gpu, curve, notes)
    else:
        centroid = _kmeans_on_distinct(distinct, multiplicity, k, niter, derived_seed(seed, z, k), gpu)
    centroid, local_id, distance = exact_membership(centroid, scaled)
    return Clustering(centroid, local_id, distance, n_distinct, curve, notes)


def _choose_k(z, distinct, multiplicity, scaled, candidates, criterion, niter, seed, gpu, curve, notes) -> np.ndarray:
    """Cluster for every candidate K, append (k, sse, bic, aic) to ``curve``; the centroids minimizing ``criterion``."""
    best_score, best_centroid, best_k = np.inf, None, None
    for k in candidates:
        centroid = _kmeans_on_distinct(distinct, multiplicity, k, niter, derived_seed(seed, z, k), gpu)
        centroid, local_id, distance = exact_membership(centroid, scaled)
        sse = within_cluster_sse(scaled, centroid, local_id)
        scores = kmeans_information_criteria(sse, np.bincount(local_id))
        for key, value in (("k", k), ("sse", float(sse.sum())), ("bic", scores["bic"]), ("aic", scores["aic"])):
            curve[key].append(value)
        if best_centroid is None or scores[criterion] < best_score:
            best_score, best_centroid, best_k = scores[criterion], centroid, k
    if best_k == candidates[-1] and len(candidates) > 1:
        notes.append(f"Z={z}: {criterion} is lowest at the largest K tried ({max(candidates)}); a larger --k-grid may fit better")
    return best_centroid


def _kmeans_on_distinct(distinct: np.ndarray, multiplicity: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> np.ndarray:
    cap = TRAIN_POINTS_PER_CENTROID * k
    if len(distinct) > cap:
        pick = np.sort(np.random.default_rng(seed).choice(len(distinct), cap, replace=False))
        distinct, multiplicity = distinct[pick], multiplicity[pick]
    return kmeans_centroids(distinct, multiplicity, k, niter, seed, gpu)


def exact_membership(centroid: np.ndarray, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-centroid membership of ``scaled`` [n, d]; centroids left without members are dropped (which moves no atom).

    Returns (centroids [k', d] float64 holding float32 values, local id [n], distance [n] float64).
    """
    while True:
        centroid = np.asarray(np.asarray(centroid, dtype=np.float32), dtype=np.float64)
        local_id, distance = nearest_prototypes(flat_index(centroid), centroid, scaled)
        used = np.bincount(local_id, minlength=len(centroid)) > 0
        if used.all():
            return centroid, local_id, distance
        centroid = centroid[used]
