"""Prototypes of every element in bounded memory: one pass to sample, one pass for exact statistics.

The latent files are read in chunks of atoms: once for the atomic numbers only (atoms per
element), once to gather, and, when an element is streamed, once more for its statistics. An
element with at most ``sample_atoms`` atoms is held whole and clustered exactly as always
(``cluster_element``). A larger element is streamed:

1. gather pass: exact per-feature mean and std over all its atoms (chunk-wise moments, merged
   with Chan's formula) and a seeded uniform sample of ``sample_atoms`` of its atoms;
2. the sample, standardized with the exact map, is clustered (k-means, and the K of ``--k auto``
   chosen on it, ``cluster_atoms``);
3. statistics pass: every atom's exact nearest centroid; per prototype the count, energy mean
   and std (Chan's merge of chunk moments) and the radius, the 95th percentile of member distances
   kept as float32 (4 bytes per streamed atom, relative error <= 2^-24 against float64 distances).

Peak memory, apart from the Python, numpy, FAISS and h5py base (~0.3 GB), with S = sample_atoms,
E elements, d clustered features, L latent columns, b bytes per latent value (4 or 8), C =
STREAM_CHUNK_ROWS, n streamed atoms and P prototypes per element (bytes):

    E S d b                  samples (or small elements) held while reading
  + 28 S d                   clustering one element (float64 copy, z-scores, float32 copy, distinct-row sort)
  + C (L b + 24 d)           one chunk read and standardized
  + n (4 + 1 or 2)           float32 member distances and their prototype ids (uint8 for P <= 256)

Only the last term grows with the number of atoms: 5 bytes per atom, 150 MB at 3e7 atoms; it
buys radii that are exact percentiles of (float32) distances without a third pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from protoalign_cli.progress import progress
from protoalign_cli.prototypes.clustering import (
    cluster_atoms,
    derived_seed,
    member_radii,
    member_statistics,
)
from protoalign_cli.prototypes.features import feature_scaling, scaling_of, standardize
from protoalign_cli.prototypes.search import flat_index, nearest_prototypes
from protoalign_cli.prototypes.sources import STREAM_CHUNK_ROWS, LatentSources

# Atoms per element held in memory: larger elements are clustered on a seeded sample of this many.
DEFAULT_SAMPLE_ATOMS = 131072


# ----------------------------------------------------------------------------- pure functions


def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Count, mean and sum of squared deviations of two groups pooled (Chan et al.); element-wise on arrays.

    A group with count 0 (and m2 0) contributes nothing; its mean is ignored.
    """
    count = count_a + count_b
    weight_b = np.divide(count_b, count, out=np.zeros(np.shape(count)), where=np.asarray(count) > 0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


def sample_indices(n_atoms: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample without replacement of ``size`` out of ``n_atoms`` (all if fewer)."""
    if size >= n_atoms:
        return np.arange(n_atoms)
    return np.sort(np.random.default_rng(seed).choice(n_atoms, size, replace=False))


def group_moments(group: np.ndarray, values: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (0..n_groups-1): count, mean and sum of squared deviations of ``values`` [n]."""
    count = np.bincount(group, minlength=n_groups)
    mean = np.bincount(group, weights=values, minlength=n_groups) / np.maximum(count, 1)
    deviation = values - mean[group]
    return count, mean, np.bincount(group, weights=deviation * deviation, minlength=n_groups)


# ----------------------------------------------------------------------------- accumulators


class FeatureMoments:
    """Exact per-feature mean and population std of rows seen chunk by chunk (float64)."""

    def __init__(self, d: int):
        self.count, self.mean, self.m2 = 0, np.zeros(d), np.zeros(d)

    def add(self, rows: np.ndarray) -> None:
        """Fold in rows [m, d]."""
        rows = np.asarray(rows, dtype=np.float64)
        mean = rows.mean(axis=0)
        deviation = rows - mean
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, len(rows), mean,
                                                       np.einsum("ij,ij->j", deviation, deviation))

    def scaling(self, standardize_features: bool) -> tuple[np.ndarray, np.ndarray]:
        """The standardization map (mean, std) of ``feature_scaling`` over every row seen."""
        return scaling_of(self.mean, np.sqrt(self.m2 / self.count), standardize_features)


class MemberAccumulator:
    """Per-prototype count, energy moments (eV) and member distances of one element, streamed."""

    def __init__(self, n_prototypes: int, n_atoms: int):
        self.count = np.zeros(n_prototypes, dtype=np.int64)
        self.energy_mean, self.energy_m2 = np.zeros(n_prototypes), np.zeros(n_prototypes)
        self.local_id = np.empty(n_atoms, dtype=np.min_scalar_type(max(n_prototypes - 1, 0)))
        self.distance = np.empty(n_atoms, dtype=np.float32)
        self.seen = 0

    def add(self, local_id: np.ndarray, distance: np.ndarray, energy: np.ndarray) -> None:
        """Fold in the memberships [m], distances [m] (standardized units) and energies [m] (eV) of m atoms."""
        moments = group_moments(local_id, energy, len(self.count))
        self.count, self.energy_mean, self.energy_m2 = merge_moments(self.count, self.energy_mean, self.energy_m2, *moments)
        stop = self.seen + len(local_id)
        self.local_id[self.seen:stop] = local_id
        self.distance[self.seen:stop] = distance
        self.seen = stop

    def statistics(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(prototypes with members [P] bool, their statistics as ``member_statistics`` gives them)."""
        used = self.count > 0
        renumber = np.cumsum(used) - 1
        count = self.count[used]
        radius = member_radii(renumber[self.local_id[:self.seen]], self.distance[:self.seen], count)
        return used, {"count": count, "energy_mean": self.energy_mean[used],
                      "energy_std": np.sqrt(self.energy_m2[used] / count), "radius": radius}


# ----------------------------------------------------------------------------- elements


@dataclasses.dataclass
class ClusterSettings:
    """How every element is clustered (``--k``, ``--k-grid``, ``--criterion``, ...)."""

    k: int | str
    k_grid: Sequence[int]
    criterion: str
    standardize: bool
    niter: int
    seed: int
    gpu: bool
    sample_atoms: int = DEFAULT_SAMPLE_ATOMS
    chunk_rows: int = STREAM_CHUNK_ROWS


@dataclasses.dataclass
class ElementPrototypes:
    """The prototypes of one element before they are written (standardized units, energies eV)."""

    z: int
    n_atoms: int
    n_sample: int
    n_distinct: int
    k_asked: int | list
    centroid: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    statistics: dict
    curve: dict
    notes: list


def cluster_element(z: int, features: np.ndarray, energy: np.ndarray, settings: ClusterSettings) -> ElementPrototypes:
    """Standardize, cluster and describe all atoms of one element held in memory.

    ``features`` [n, d] selected latent columns, ``energy`` [n] energy minus E0 (eV).
    """
    features = np.asarray(features, dtype=np.float64)
    mean, std = feature_scaling(features, settings.standardize)
    scaled = standardize(features, mean, std)
    clustering = _cluster(z, scaled, settings)
    statistics = member_statistics(clustering.local_id, clustering.distance, energy, len(clustering.centroid))
    return ElementPrototypes(
        z=z, n_atoms=len(features), n_sample=len(features), n_distinct=clustering.n_distinct, k_asked=_k_asked(settings),
        centroid=clustering.centroid, feature_mean=mean, feature_std=std, statistics=statistics,
        curve=clustering.curve, notes=clustering.notes,
    )


def prototypes_of_elements(sources: LatentSources, columns: np.ndarray, counts: dict[int, int],
                           settings: ClusterSettings, report: Callable[[str], None]) -> list[ElementPrototypes]:
    """Prototypes of every element of ``counts`` ({Z: atoms}), reading the latent files once or twice.

    Each read shows its progress on stderr (``protoalign_cli.progress``: a bar on a terminal, lines in a log).
    """
    gatherers = {z: _Gatherer(z, n, len(columns), sources.first.dtype, settings) for z, n in counts.items()}
    with progress(total=sum(counts.values()), desc="prototypes: reading latents", unit="atom") as bar:
        for chunk in sources.chunks(columns, settings.chunk_rows):
            for z, rows in _rows_by_element(chunk.atomic_number, gatherers):
                gatherers[z].add(chunk.features[rows], chunk.energy[rows])
            bar.update(len(chunk.atomic_number))
    elements, pending = {}, {}
    for z, gatherer in gatherers.items():
        if gatherer.moments is None:
            report(f"Z={z}: clustering {counts[z]} atoms x {len(columns)} features")
            elements[z] = cluster_element(z, gatherer.rows, gatherer.energy, settings)
            _report_notes_and_size(elements[z], report)
        else:
            report(f"Z={z}: clustering a sample of {len(gatherer.rows)} of {counts[z]} atoms x {len(columns)} features")
            pending[z] = _StreamedElement(gatherer, settings)
        gatherers[z] = None
    if pending:
        _statistics_pass(sources, columns, pending, settings.chunk_rows, sum(counts.values()))
        for z, element in pending.items():
            elements[z] = element.result()
            _report_notes_and_size(elements[z], report)
    return [elements[z] for z in counts]


def _report_notes_and_size(element: ElementPrototypes, report: Callable[[str], None]) -> None:
    for note in element.notes:
        report(note)
    report(f"Z={element.z}: {len(element.centroid)} prototypes")


def _cluster(z: int, scaled: np.ndarray, settings: ClusterSettings):
    return cluster_atoms(z, scaled, settings.k, settings.k_grid, settings.criterion, settings.niter, settings.seed,
                         settings.gpu)


def _k_asked(settings: ClusterSettings) -> int | list:
    return list(settings.k_grid) if settings.k == "auto" else settings.k


def _rows_by_element(atomic_number: np.ndarray, wanted) -> list[tuple[int, np.ndarray]]:
    """(Z, row indices) of each element of ``wanted`` present in ``atomic_number``, rows ascending."""
    order = np.argsort(atomic_number, kind="stable")
    values, starts = np.unique(atomic_number[order], return_index=True)
    bounds = np.append(starts, len(order))
    return [(int(z), order[bounds[i]:bounds[i + 1]]) for i, z in enumerate(values.tolist()) if int(z) in wanted]


class _Gatherer:
    """One element's atoms during the gather pass: all of them, or a sample plus exact feature moments."""

    def __init__(self, z: int, n_atoms: int, d: int, dtype: str, settings: ClusterSettings):
        self.keep = sample_indices(n_atoms, settings.sample_atoms, derived_seed(settings.seed, z))
        self.rows = np.empty((len(self.keep), d), dtype=dtype)
        self.energy = np.empty(len(self.keep))
        self.moments = FeatureMoments(d) if n_atoms > settings.sample_atoms else None
        self.z, self.n_atoms, self.seen = z, n_atoms, 0

    def add(self, rows: np.ndarray, energy: np.ndarray) -> None:
        """Fold in the next atoms of the element (in file order)."""
        lo, hi = np.searchsorted(self.keep, [self.seen, self.seen + len(rows)])
        take = self.keep[lo:hi] - self.seen
        self.rows[lo:hi] = rows[take]
        self.energy[lo:hi] = energy[take]
        if self.moments is not None:
            self.moments.add(rows)
        self.seen += len(rows)


class _StreamedElement:
    """An element clustered on its sample, waiting for the statistics pass over all its atoms."""

    def __init__(self, gatherer: _Gatherer, settings: ClusterSettings):
        self.z, self.n_atoms, self.n_sample = gatherer.z, gatherer.n_atoms, len(gatherer.rows)
        self.k_asked = _k_asked(settings)
        self.mean, self.std = gatherer.moments.scaling(settings.standardize)
        self.clustering = _cluster(self.z, standardize(gatherer.rows, self.mean, self.std), settings)
        self.clustering.notes.insert(0, f"Z={self.z}: {self.n_atoms} atoms, more than --sample-atoms; clustered (and K "
                                        f"chosen) on a seeded sample of {self.n_sample}, statistics over all atoms")
        self.index = flat_index(self.clustering.centroid)
        self.members = MemberAccumulator(len(self.clustering.centroid), gatherer.n_atoms)

    def add(self, rows: np.ndarray, energy: np.ndarray) -> None:
        """Fold in the next atoms of the element: exact nearest centroid, distance, energy (eV)."""
        local_id, distance = nearest_prototypes(self.index, self.clustering.centroid, standardize(rows, self.mean, self.std))
        self.members.add(local_id, distance, energy)

    def result(self) -> ElementPrototypes:
        """The element's prototypes: centroids with members over all atoms, and their statistics."""
        used, statistics = self.members.statistics()
        clustering = self.clustering
        return ElementPrototypes(
            z=self.z, n_atoms=self.n_atoms, n_sample=self.n_sample, n_distinct=clustering.n_distinct, k_asked=self.k_asked,
            centroid=clustering.centroid[used], feature_mean=self.mean, feature_std=self.std, statistics=statistics,
            curve=clustering.curve, notes=clustering.notes,
        )


def _statistics_pass(sources: LatentSources, columns: np.ndarray, pending: dict, chunk_rows: int, n_atoms: int) -> None:
    with progress(total=n_atoms, desc="prototypes: member statistics", unit="atom") as bar:
        for chunk in sources.chunks(columns, chunk_rows):
            for z, rows in _rows_by_element(chunk.atomic_number, pending):
                pending[z].add(chunk.features[rows], chunk.energy[rows])
            bar.update(len(chunk.atomic_number))
