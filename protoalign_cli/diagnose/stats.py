"""Pure statistics of ``protoalign diagnose``: coverage, usage, composition fits, correlations, agreement.

Units: energies in eV in, meV in the returned tables where a key says so (``*_meV``); distance
ratios are dimensionless. Every function here is pure (arrays in, arrays or JSON-ready rows out).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def symbol(z: int) -> str:
    """Chemical symbol of an atomic number."""
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def element_coverage(atomic_number: np.ndarray, ratio: np.ndarray, radius_factor: float,
                     elements_with_prototypes: Sequence[int]) -> dict[int, dict]:
    """Per element: atoms, atoms covered (ratio <= radius_factor), coverage and ratio quantiles."""
    atomic_number = np.asarray(atomic_number)
    table = {}
    for z in np.unique(atomic_number):
        r = ratio[atomic_number == z]
        inside = int(np.count_nonzero(r <= radius_factor))
        finite = r[np.isfinite(r)]
        quantiles = {f"p{q}": float(np.percentile(finite, q)) for q in (50, 90, 99)} if len(finite) else {}
        table[int(z)] = {
            "n_atoms": int(len(r)),
            "n_covered": inside,
            "coverage": inside / len(r),
            "has_prototypes": int(z) in set(int(e) for e in elements_with_prototypes),
            "ratio_quantiles": quantiles,
            "ratio_max": float(finite.max()) if len(finite) else None,
        }
    return table


def prototype_usage(prototype_id: np.ndarray, n_prototypes: int) -> np.ndarray:
    """Number of target atoms assigned to each prototype ([P] int); unassigned atoms (-1) ignored."""
    prototype_id = np.asarray(prototype_id)
    return np.bincount(prototype_id[prototype_id >= 0], minlength=n_prototypes)


def composition_matrix(config_index: np.ndarray, atomic_number: np.ndarray, elements: Sequence[int],
                       n_configs: int) -> np.ndarray:
    """Atoms of each element in each configuration ([n_configs, len(elements)] float)."""
    counts = np.zeros((n_configs, len(elements)))
    for j, z in enumerate(elements):
        mask = np.asarray(atomic_number) == z
        counts[:, j] = np.bincount(np.asarray(config_index)[mask], minlength=n_configs)
    return counts


def per_config_sum(config_index: np.ndarray, values: np.ndarray, n_configs: int) -> np.ndarray:
    """Sum of per-atom values over each configuration ([n_configs], units of ``values``)."""
    return np.bincount(np.asarray(config_index), weights=np.asarray(values, dtype=np.float64), minlength=n_configs)


def fit_element_offsets(composition: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Least-squares per-element offsets o minimising |residual - composition @ o| (eV per atom).

    With a single composition (one molecule) the offsets are not identifiable one by one; the
    minimum-norm solution is returned, whose total per configuration is the mean residual.
    """
    offsets, *_ = np.linalg.lstsq(np.asarray(composition, dtype=np.float64), np.asarray(residual, dtype=np.float64),
                                  rcond=None)
    return offsets


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two arrays; None when fewer than 2 values or one of them is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def beyond_composition(values: np.ndarray, composition: np.ndarray) -> np.ndarray:
    """What per-element offsets cannot explain: ``values`` less their least-squares fit by
    ``composition @ offsets`` ([n_configs], units of ``values``). For one composition: values - mean."""
    values = np.asarray(values, dtype=np.float64)
    return values - composition @ fit_element_offsets(composition, values)


def offset_corrected_errors(predicted: np.ndarray, reference: np.ndarray, composition: np.ndarray) -> dict:
    """Compare per-configuration predictions (eV) with references after fitted per-element offsets.

    Returns MAE before and after the offsets (meV per configuration and meV per atom), the
    Pearson correlation of the corrected prediction with the reference (``pearson``) and of both
    beyond composition (``pearson_beyond_composition``, the same for a single composition, and the
    meaningful one for mixed compositions, where composition alone correlates almost perfectly),
    and the offsets (eV per atom, element order of ``composition``). The corrected prediction less
    the reference equals ``beyond_composition(predicted) - beyond_composition(reference)``.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    offsets = fit_element_offsets(composition, reference - predicted)
    corrected = predicted + composition @ offsets
    n_atoms = composition.sum(axis=1)
    error = corrected - reference
    return {
        "n_configs": int(len(reference)),
        "mae_raw_meV": float(np.mean(np.abs(predicted - reference)) * 1000),
        "mae_meV": float(np.mean(np.abs(error)) * 1000),
        "mae_meV_per_atom": float(np.mean(np.abs(error) / n_atoms) * 1000),
        "rmse_meV": float(np.sqrt(np.mean(error ** 2)) * 1000),
        "pearson": pearson(corrected, reference),
        "pearson_beyond_composition": pearson(beyond_composition(predicted, composition),
                                              beyond_composition(reference, composition)),
        "offsets_eV": offsets,
    }


def atom_energy_agreement(atomic_number: np.ndarray, eps: np.ndarray, eps_star: np.ndarray,
                          member_std: np.ndarray) -> dict[int, dict]:
    """Per element: agreement of atom energies eps_i with assigned prototype energies eps*_p(i) (eV in).

    ``member_std`` [n] is the energy std of each atom's prototype over its source members (eV).
    Returned (meV): ``bias`` mean of eps - eps*; ``mae`` mean |eps - eps* - bias|; ``mae_raw``
    mean |eps - eps*|; ``rms`` root mean square of eps - eps* - bias; ``source_rms_std`` root mean
    square of ``member_std``, which is what ``rms`` is for the source atoms themselves;
    ``scatter_ratio`` = rms / source_rms_std (1: target atoms scatter around their prototype
    energies as the source members do); ``bias_ratio`` = |bias| / source_rms_std; and ``pearson``
    of eps with eps*.
    """
    atomic_number = np.asarray(atomic_number)
    table = {}
    for z in np.unique(atomic_number):
        mask = atomic_number == z
        diff = eps[mask] - eps_star[mask]
        bias = float(diff.mean())
        rms = float(np.sqrt(np.mean((diff - bias) ** 2)))
        source = float(np.sqrt(np.mean(member_std[mask] ** 2)))
        table[int(z)] = {
            "n_atoms": int(mask.sum()),
            "bias_meV": bias * 1000,
            "mae_meV": float(np.mean(np.abs(diff - bias)) * 1000),
            "mae_raw_meV": float(np.mean(np.abs(diff)) * 1000),
            "rms_meV": rms * 1000,
            "source_rms_std_meV": source * 1000,
            "scatter_ratio": rms / source if source > 0 else None,
            "bias_ratio": abs(bias) / source if source > 0 else None,
            "pearson": pearson(eps[mask], eps_star[mask]),
        }
    return table


def element_bias(atomic_number: np.ndarray, difference: np.ndarray) -> np.ndarray:
    """Per atom, the mean of ``difference`` over the atoms of its element ([n], units of ``difference``)."""
    atomic_number = np.asarray(atomic_number)
    bias = np.zeros(len(atomic_number))
    for z in np.unique(atomic_number):
        mask = atomic_number == z
        bias[mask] = difference[mask].mean()
    return bias


def prototype_disagreement(prototype_id: np.ndarray, abs_difference: np.ndarray, n_prototypes: int) -> np.ndarray:
    """Mean |eps_i - eps*_p| over each prototype's target atoms ([P]; NaN for unused prototypes)."""
    prototype_id = np.asarray(prototype_id)
    used = prototype_id >= 0
    total = np.bincount(prototype_id[used], weights=abs_difference[used], minlength=n_prototypes)
    count = np.bincount(prototype_id[used], minlength=n_prototypes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def wide_prototypes(energy_std: np.ndarray, threshold_eV: float) -> np.ndarray:
    """Indices of prototypes whose member energy standard deviation exceeds ``threshold_eV``."""
    return np.flatnonzero(np.asarray(energy_std) > threshold_eV)


def fixed_molecule_files(atoms_list: Sequence, counts: Sequence[int]) -> list[int]:
    """Indices of the target files whose configurations all have the same atomic numbers in the same order."""
    fixed, start = [], 0
    for f, count in enumerate(counts):
        first = atoms_list[start].numbers
        if all(np.array_equal(atoms.numbers, first) for atoms in atoms_list[start:start + count]):
            fixed.append(f)
        start += count
    return fixed


def site_statistics(file_index: np.ndarray, atom_index: np.ndarray, atomic_number: np.ndarray, ratio: np.ndarray,
                    radius_factor: float, difference: np.ndarray, fixed_files: Sequence[int]) -> list[dict]:
    """Per site of a fixed molecule (a target file whose configurations all have the same atoms in
    the same order): coverage over its configurations, median distance ratio (None if infinite)
    and the mean pretrained eps - eps* (meV; None without prototypes). ``difference`` [n] in eV,
    NaN where unassigned."""
    rows = []
    for f in fixed_files:
        in_file = np.asarray(file_index) == f
        for a in np.unique(atom_index[in_file]):
            mask = in_file & (atom_index == a)
            median = float(np.median(ratio[mask]))
            shift = difference[mask]
            rows.append({
                "file": int(f), "atom_index": int(a), "element": symbol(atomic_number[mask][0]),
                "n_configs": int(mask.sum()), "coverage": float(np.mean(ratio[mask] <= radius_factor)),
                "ratio_median": median if np.isfinite(median) else None,
                "pretrained_bias_meV": float(shift.mean()) * 1000 if np.isfinite(shift).all() else None,
            })
    return rows


def pca_2d(points: np.ndarray) -> np.ndarray:
    """Project points ([n, d]) on their first two principal axes (numpy SVD); [n, 2]."""
    centered = np.asarray(points, dtype=np.float64) - np.mean(points, axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    projected = centered @ vt[:2].T
    if projected.shape[1] < 2:
        projected = np.hstack([projected, np.zeros((len(projected), 2 - projected.shape[1]))])
    return projected


def tsne_2d(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE embedding of points ([n, d]) in 2-D with scikit-learn (imported here); [n, 2]."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (len(points) - 1) / 3)))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(points)
