"""Stage 2: per-element prototypes of source latents, FAISS-indexed, with member energy statistics.

For every chemical element, the selected latent columns of its atoms are standardized (per-feature
z-scores of that element; stored so that new latents are mapped the same way) and clustered with
FAISS k-means. Each prototype carries its centroid (standardized space), member count, the mean
and standard deviation of its members' energy minus E0 (eV) and a radius, the 95th percentile of
the members' Euclidean distances to the centroid (standardized units), which later stages use to
recognise atoms that lie outside the source distribution.

Membership is always the exact nearest centroid (``nearest_prototypes``), the same search that
``assign`` runs, so the stored statistics are those that ``assign`` reproduces.

With ``--k auto`` the number of prototypes per element is chosen over a grid by an information
criterion (``kmeans_information_criteria``): the k-means partition read as a hard-assignment mixture
of Gaussians sharing one diagonal variance.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from protoalign_cli import __version__, schema
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.outputs import atomic_output, check_writable
from protoalign_cli.provenance import command_line, package_version, run_summary, sha256_file, write_summary
from protoalign_cli.schema import Prototypes

__all__ = ["Prototypes", "PrototypesRequest", "assign", "build_prototypes", "load_prototypes"]

FEATURE_KINDS = {"all": ("interaction", "energy"), "interaction": ("interaction",), "energy": ("energy",)}
DEFAULT_K_GRID = (2, 4, 8, 16, 32, 64)
CRITERIA = ("bic", "aic")
RADIUS_PERCENTILE = 95.0
# k-means trains on at most this many distinct atoms per centroid (a seeded uniform subsample of the
# distinct rows, weighted by multiplicity; FAISS's own default cap). Memberships and statistics
# always use every atom.
TRAIN_POINTS_PER_CENTROID = 256
ASSIGN_CHUNK_ROWS = 4096
VERSIONED_PACKAGES = ("mace-torch", "torch", "faiss-cpu", "h5py", "numpy")


# ----------------------------------------------------------------------------- pure functions


def feature_columns(header: schema.LatentHeader, features: str) -> np.ndarray:
    """Latent column indices of the blocks clustered for ``features`` ('all', 'interaction', 'energy')."""
    if features not in FEATURE_KINDS:
        raise ProtoalignError(f"--features must be one of {', '.join(FEATURE_KINDS)}, not {features!r}")
    columns = header.columns(FEATURE_KINDS[features])
    if not columns.size:
        raise ProtoalignError(f"the latent layout has no block of kind {' or '.join(FEATURE_KINDS[features])}")
    return columns.astype(np.int64)


def select_features(latent: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The clustered columns of full latent rows ([n, latent_dim] -> [n, d]); a view when contiguous."""
    columns = np.asarray(columns)
    if columns.size and np.array_equal(columns, np.arange(columns[0], columns[0] + columns.size)):
        return latent[:, columns[0]:columns[0] + columns.size]
    return latent[:, columns]


def feature_scaling(features: np.ndarray, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``features`` [n, d] (float64).

    Features whose spread is zero (std <= 1e-12 * max(1, |mean|)) get std 1, so they map to 0
    instead of dividing by zero. Without ``standardize`` the identity map is returned (mean 0, std 1).
    """
    d = features.shape[1]
    if not standardize:
        return np.zeros(d), np.ones(d)
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean, std


def standardize(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Z-scores ``(features - mean) / std`` in float64 ([n, d]), the map stored in a prototype file."""
    scaled = np.subtract(features, mean, dtype=np.float64)
    np.divide(scaled, std, out=scaled)
    return scaled


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
    order = np.argsort(prototype_id, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(count)])
    sorted_distance = distance[order]
    radius = np.array([np.percentile(sorted_distance[bounds[p]:bounds[p + 1]], RADIUS_PERCENTILE)
                       for p in range(n_prototypes)])
    return {"count": count.astype(np.int64), "energy_mean": energy_mean, "energy_std": energy_std, "radius": radius}


def parse_k(text: str | int) -> int | str:
    """Parse ``--k``: a positive integer or 'auto'."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        k = int(text)
    except (TypeError, ValueError):
        raise ProtoalignError(f"--k must be a positive integer or 'auto', not {text!r}") from None
    if k < 1:
        raise ProtoalignError(f"--k must be >= 1, not {k}")
    return k


def parse_k_grid(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``--k-grid`` ('2,4,8' or a sequence): distinct positive integers, ascending."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        grid = sorted({int(part) for part in parts if str(part).strip()})
    except ValueError:
        raise ProtoalignError(f"--k-grid must be comma-separated positive integers, not {text!r}") from None
    if not grid or grid[0] < 1:
        raise ProtoalignError(f"--k-grid must hold positive integers, not {text!r}")
    return tuple(grid)


def derived_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and keys (element, K), independent of processing order."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- FAISS


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


# ----------------------------------------------------------------------------- clustering one element


@dataclasses.dataclass
class ElementPrototypes:
    """The prototypes of one element before they are written (standardized units, energies eV)."""

    z: int
    n_atoms: int
    n_distinct: int
    k_asked: int | list
    centroid: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    statistics: dict
    curve: dict
    notes: list


def cluster_element(z: int, features: np.ndarray, energy: np.ndarray, k: int | str, k_grid: Sequence[int],
                    criterion: str, standardize_features: bool, niter: int, seed: int, gpu: bool) -> ElementPrototypes:
    """Standardize, cluster and describe the atoms of one element.

    ``features`` [n, d] selected latent columns, ``energy`` [n] energy minus E0 (eV). With ``k`` =
    'auto' every K of ``k_grid`` below the number of distinct atoms is tried and the one with the
    lowest ``criterion`` kept; an element with no more distinct atoms than K gets one prototype per
    distinct atom.
    """
    mean, std = feature_scaling(features, standardize_features)
    scaled = standardize(features, mean, std)
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
    centroid, local_id, distance = _exact_membership(centroid, scaled)
    statistics = member_statistics(local_id, distance, energy, len(centroid))
    return ElementPrototypes(
        z=z, n_atoms=len(features), n_distinct=n_distinct, k_asked=list(k_grid) if k == "auto" else k,
        centroid=centroid, feature_mean=mean, feature_std=std, statistics=statistics, curve=curve, notes=notes,
    )


def _choose_k(z, distinct, multiplicity, scaled, candidates, criterion, niter, seed, gpu, curve, notes) -> np.ndarray:
    """Cluster for every candidate K, append (k, sse, bic, aic) to ``curve``; the centroids minimizing ``criterion``."""
    best_score, best_centroid, best_k = np.inf, None, None
    for k in candidates:
        centroid = _kmeans_on_distinct(distinct, multiplicity, k, niter, derived_seed(seed, z, k), gpu)
        centroid, local_id, distance = _exact_membership(centroid, scaled)
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


def _exact_membership(centroid: np.ndarray, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-centroid membership; centroids left without members are dropped (which moves no atom)."""
    while True:
        centroid = np.asarray(np.asarray(centroid, dtype=np.float32), dtype=np.float64)
        local_id, distance = nearest_prototypes(flat_index(centroid), centroid, scaled)
        used = np.bincount(local_id, minlength=len(centroid)) > 0
        if used.all():
            return centroid, local_id, distance
        centroid = centroid[used]


# ----------------------------------------------------------------------------- build


@dataclasses.dataclass
class PrototypesRequest:
    """Everything ``protoalign prototypes`` was asked to do."""

    latents: Sequence[Path]
    out: Path
    k: int | str = "auto"
    k_grid: Sequence[int] = DEFAULT_K_GRID
    criterion: str = "bic"
    features: str = "all"
    standardize: bool = True
    niter: int = 25
    seed: int = 0
    gpu: bool = False
    overwrite: bool = False


def summary_path(out: Path) -> Path:
    """Where the JSON run summary of a prototype file goes (``P.h5`` -> ``P.h5.json``)."""
    return Path(f"{out}.json")


def build_prototypes(request: PrototypesRequest, report: Callable[[str], None] = lambda message: None) -> dict:
    """Cluster the latent files' atoms per element into a prototype file; return the run summary.

    ``report`` receives progress and warning lines (one per call). Raises ProtoalignError on bad
    input before anything is written; the output (and its ``.json`` summary) appear only complete.
    """
    started = time.perf_counter()
    k = parse_k(request.k)
    k_grid = parse_k_grid(request.k_grid)
    if request.criterion not in CRITERIA:
        raise ProtoalignError(f"--criterion must be one of {', '.join(CRITERIA)}, not {request.criterion!r}")
    if request.niter < 1:
        raise ProtoalignError(f"--niter must be >= 1, not {request.niter}")
    if request.seed < 0:
        raise ProtoalignError(f"--seed must be >= 0, not {request.seed}")
    paths = [Path(p) for p in request.latents]
    if not paths:
        raise ProtoalignError("give at least one latent file")
    out = Path(request.out)
    for target in (out, summary_path(out)):
        check_writable(target, request.overwrite)
    if out.resolve() in {p.resolve() for p in paths}:
        raise ProtoalignError(f"--out {out} is one of the input latent files")

    headers = [_latent_header(path) for path in paths]
    _check_compatible(paths, headers)
    first = headers[0]
    columns = feature_columns(first, request.features)
    gpu = bool(request.gpu)
    if gpu and not gpu_available():
        report("--gpu: FAISS has no GPU here (faiss-cpu build or no visible GPU); clustering on the CPU")
        gpu = False

    features, atomic_number, energy, latent_files = _read_inputs(paths, columns)
    model_elements = sorted(int(z) for z in first.e0s[first.head])
    present = [int(z) for z in np.unique(atomic_number)]
    notes = []
    missing = [z for z in model_elements if z not in present]
    if missing:
        notes.append(f"no source atoms of Z={', '.join(map(str, missing))}: those elements get no prototypes "
                     "(assign returns -1 for them)")
        report(notes[-1])

    elements = []
    for z in present:
        rows = np.flatnonzero(atomic_number == z)
        report(f"Z={z}: clustering {len(rows)} atoms x {len(columns)} features")
        result = cluster_element(z, features[rows], energy[rows], k, k_grid, request.criterion, request.standardize,
                                 request.niter, request.seed, gpu)
        for note in result.notes:
            report(note)
        notes += result.notes
        report(f"Z={z}: {len(result.centroid)} prototypes")
        elements.append(result)

    prototypes = _assemble(first, latent_files, headers, request, k, k_grid, columns, elements, notes)
    summary = run_summary("prototypes", inputs={
        "latents": [str(p) for p in paths], "out": str(out), "k": str(k), "k_grid": list(k_grid),
        "criterion": request.criterion, "features": request.features, "standardize": request.standardize,
        "niter": request.niter, "seed": request.seed, "gpu": request.gpu, "gpu_used": gpu,
    }, results={
        "model_sha256": first.model_sha256, "head": first.head, "n_prototypes": int(len(prototypes.element)),
        "n_features": int(len(columns)),
        "elements": {str(e.z): {"n_atoms": e.n_atoms, "n_distinct": e.n_distinct, "k_asked": e.k_asked,
                                "k_chosen": int(len(e.centroid)), "curve": e.curve} for e in elements},
        "elements_without_atoms": missing, "notes": notes, "latent_files": latent_files,
        "seconds": round(time.perf_counter() - started, 3),
    })
    with atomic_output(out, request.overwrite) as tmp, atomic_output(summary_path(out), request.overwrite) as tmp_summary:
        schema.write_prototypes(tmp, prototypes)
        write_summary(tmp_summary, summary)
    return summary


def _latent_header(path: Path) -> schema.LatentHeader:
    with schema.open_latents(path) as handle:
        try:
            header = schema.LatentHeader.from_attrs(handle.attrs)
            n_atoms = handle[schema.ATOMIC_NUMBER].shape[0]
        except ProtoalignError as exc:
            raise ProtoalignError(f"latent file {path}: {exc}") from exc
        except Exception as exc:
            raise ProtoalignError(f"latent file {path} is corrupt: {type(exc).__name__}: {exc}") from exc
    if n_atoms == 0:
        raise ProtoalignError(f"latent file {path} holds no atoms")
    return header


def _check_compatible(paths: Sequence[Path], headers: Sequence[schema.LatentHeader]) -> None:
    first = headers[0]
    for path, header in zip(paths[1:], headers[1:]):
        for field, what in (("model_sha256", "model"), ("head", "head"), ("layout", "latent layout"), ("dtype", "dtype")):
            if getattr(header, field) != getattr(first, field):
                raise ProtoalignError(
                    f"{path} and {paths[0]} differ in {what} ({field} {getattr(header, field)!r} vs "
                    f"{getattr(first, field)!r}); prototypes need latents of one model and head"
                )


def _read_inputs(paths: Sequence[Path], columns: np.ndarray):
    """Selected features [n, d] float64, atomic numbers, energies minus E0 (eV) and per-file provenance."""
    features, atomic_number, energy, files = [], [], [], []
    for path in paths:
        latents = schema.read_latents(path)
        selected = np.asarray(select_features(latents.latent, columns), dtype=np.float64)
        if not np.isfinite(selected).all() or not np.isfinite(latents.energy_minus_e0).all():
            raise ProtoalignError(f"latent file {path} holds non-finite latents or energies")
        features.append(selected)
        atomic_number.append(latents.atomic_number)
        energy.append(latents.energy_minus_e0)
        files.append({"path": str(Path(path).resolve()), "sha256": sha256_file(path), "n_atoms": latents.n_atoms,
                      "structure_files": latents.header.source_files})
        del latents
    if len(paths) == 1:
        return features[0], atomic_number[0], energy[0], files
    return np.concatenate(features), np.concatenate(atomic_number), np.concatenate(energy), files


def _assemble(first, latent_files, headers, request, k, k_grid, columns, elements, notes) -> Prototypes:
    structure_files: list[str] = []
    for header in headers:
        structure_files += [s for s in header.source_files if s not in structure_files]

    def stacked(key):
        return np.concatenate([e.statistics[key] for e in elements])

    return Prototypes(
        model_sha256=first.model_sha256, model_path=first.model_path, model_type=first.model_type,
        mace_version=first.mace_version, r_max=float(first.r_max), head=first.head, heads=list(first.heads),
        e0s=first.e0s, layout=first.layout, latent_dtype=first.dtype, latent_files=latent_files,
        structure_files=structure_files, features=request.features, columns=np.asarray(columns, dtype=np.int64),
        standardized=bool(request.standardize), k_requested=str(k), k_grid=list(k_grid), criterion=request.criterion,
        seed=int(request.seed), niter=int(request.niter),
        element=np.concatenate([np.full(len(e.centroid), e.z, dtype=np.int32) for e in elements]),
        centroid=np.concatenate([e.centroid for e in elements]),
        count=stacked("count"), energy_mean=stacked("energy_mean"), energy_std=stacked("energy_std"),
        radius=stacked("radius"),
        elements=np.array([e.z for e in elements], dtype=np.int32),
        feature_mean=np.stack([e.feature_mean for e in elements]), feature_std=np.stack([e.feature_std for e in elements]),
        n_atoms=np.array([e.n_atoms for e in elements], dtype=np.int64),
        n_distinct=np.array([e.n_distinct for e in elements], dtype=np.int64),
        index={e.z: flat_index(e.centroid) for e in elements},
        curves={e.z: e.curve for e in elements},
        command_line=command_line(), protoalign_version=__version__,
        versions={name: package_version(name) for name in VERSIONED_PACKAGES}, notes=list(notes),
    )


# ----------------------------------------------------------------------------- use


def load_prototypes(path: Path) -> Prototypes:
    """Read a prototype file written by ``protoalign prototypes`` (FAISS indexes deserialized)."""
    return schema.read_prototypes(Path(path))


def assign(prototypes: Prototypes, latents: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest prototype of each atom, searched exactly among the prototypes of the atom's element.

    ``latents`` [n, latent_dim] are full latent rows as stored in latent files (same model, head and
    layout as the prototypes), ``Z`` [n] atomic numbers. Returns ``prototype_id`` [n] int64, a global
    index into the per-prototype arrays (-1 where the element has no prototypes), and ``distance``
    [n] float64, the Euclidean distance in the element's standardized feature space (inf for -1).
    """
    latents = np.asarray(latents)
    Z = np.asarray(Z).reshape(-1)
    latent_dim = sum(block["size"] for block in prototypes.layout)
    if latents.ndim != 2 or latents.shape[1] != latent_dim:
        raise ProtoalignError(f"latents have shape {latents.shape}; the prototypes' layout has {latent_dim} columns")
    if len(Z) != len(latents):
        raise ProtoalignError(f"{len(latents)} latent rows but {len(Z)} atomic numbers")
    prototype_id = np.full(len(Z), -1, dtype=np.int64)
    distance = np.full(len(Z), np.inf)
    for e, z in enumerate(prototypes.elements):
        rows = np.flatnonzero(Z == z)
        if not rows.size:
            continue
        offset = int(np.searchsorted(prototypes.element, z))
        centroid = prototypes.centroid[offset:offset + prototypes.index[int(z)].ntotal]
        for start in range(0, len(rows), ASSIGN_CHUNK_ROWS):
            chunk = rows[start:start + ASSIGN_CHUNK_ROWS]
            scaled = standardize(select_features(latents[chunk], prototypes.columns),
                                 prototypes.feature_mean[e], prototypes.feature_std[e])
            local_id, chunk_distance = nearest_prototypes(prototypes.index[int(z)], centroid, scaled)
            prototype_id[chunk] = np.where(local_id >= 0, local_id + offset, -1)
            distance[chunk] = chunk_distance
    return prototype_id, distance
