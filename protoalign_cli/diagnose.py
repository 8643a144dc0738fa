"""Stage 4: can a target trust the prototypes? Coverage, energy consistency and spread.

Units: energies in eV inside the code, meV in the report where it says so; distances in the
prototypes' standardized feature space (the units of ``prototypes.assign``).

Definitions (docs/diagnose.md explains them at length):

- distance ratio of a target atom: its distance to the nearest prototype of its element divided by
  that prototype's radius (the 95th percentile of the source members' distances). Atoms of an
  element without prototypes have ratio ``inf``.
- covered: ratio <= ``radius_factor``; coverage = fraction of target atoms covered. With
  ``radius_factor`` 1 about 5 % of the *source* members themselves are outside (by the definition
  of the radius); the default 1.5 tolerates that tail, so that a target like the source reads 1.
- prototype predictor of a configuration: E_pred = sum_i (E0_Z(i) + eps*_p(i)), eps*_p the mean
  energy-minus-E0 of prototype p's source members. It is compared with reference energies after
  per-element offsets fitted by least squares on the residual (the same correction for the
  composition-only baseline, sum_i E0_Z(i), and for the pretrained model's own total energy).
- per-atom agreement: eps_i (a model's atom energy minus that model's own E0) against eps*_p(i);
  "bias" is the per-element mean of eps_i - eps*_p(i) (for a fine-tuned model it includes its
  re-estimated E0s), "mae" the mean |eps_i - eps*_p(i) - bias| in meV. The "scatter ratio"
  divides the RMS of eps_i - eps*_p(i) - bias by the RMS member energy std of the assigned
  prototypes, which is what that RMS is for the source atoms themselves: 1 means target atoms
  sit around their prototype energies as the source members do; much more than 1 means latent
  neighbours do not have comparable energies, and pulling towards eps* is a bias.
- spread: prototypes whose member energy std exceeds a threshold are flagged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli import schema
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.outputs import atomic_directory, check_writable

DEFAULT_ENERGY_KEY = "REF_energy"
DEFAULT_RADIUS_FACTOR = 1.5
DEFAULT_SPREAD_THRESHOLD_MEV = 50.0
SAFE_COVERAGE = 0.9
SAFE_SCATTER_RATIO = 1.5
WORST_PROTOTYPES_SHOWN = 10
MAP_POINTS_PER_ELEMENT = 3000
FIGURE_DPI = 100
PREDICTORS = ("prototype", "composition_only", "pretrained_model")


# ----------------------------------------------------------------------------------------------
# Pure statistics
# ----------------------------------------------------------------------------------------------

def distance_ratio(distance: np.ndarray, prototype_id: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Distance to the nearest prototype divided by its radius, per atom ([n], dimensionless).

    ``inf`` where the atom's element has no prototype (``prototype_id`` -1) or where the
    prototype's radius is 0 and the atom is not on its centroid.
    """
    distance = np.asarray(distance, dtype=np.float64)
    prototype_id = np.asarray(prototype_id)
    ratio = np.full(distance.shape, np.inf)
    known = prototype_id >= 0
    r = np.asarray(radius, dtype=np.float64)[prototype_id[known]]
    d = distance[known]
    positive = r > 0
    ratio_known = np.where(d > 0, np.inf, 0.0)
    ratio_known[positive] = d[positive] / r[positive]
    ratio[known] = ratio_known
    return ratio


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


def pca_2d(points: np.ndarray) -> np.ndarray:
    """Project points ([n, d]) on their first two principal axes (numpy SVD); [n, 2]."""
    centered = np.asarray(points, dtype=np.float64) - np.mean(points, axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    projected = centered @ vt[:2].T
    if projected.shape[1] < 2:
        projected = np.hstack([projected, np.zeros((len(projected), 2 - projected.shape[1]))])
    return projected


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


def fixed_molecule_files(atoms_list: Sequence, counts: Sequence[int]) -> list[int]:
    """Indices of the target files whose configurations all have the same atomic numbers in the same order."""
    fixed, start = [], 0
    for f, count in enumerate(counts):
        first = atoms_list[start].numbers
        if all(np.array_equal(atoms.numbers, first) for atoms in atoms_list[start:start + count]):
            fixed.append(f)
        start += count
    return fixed


def standardized_features(prototypes, latent: np.ndarray, atomic_number: np.ndarray) -> np.ndarray:
    """Target latents in the prototypes' per-element standardized feature space ([n, d]).

    Rows of elements without prototypes are NaN.
    """
    from protoalign_cli.prototypes import select_features, standardize

    atomic_number = np.asarray(atomic_number)
    features = np.full((len(latent), len(prototypes.columns)), np.nan)
    for e, z in enumerate(prototypes.elements):
        rows = np.flatnonzero(atomic_number == z)
        features[rows] = standardize(select_features(latent[rows], prototypes.columns),
                                     prototypes.feature_mean[e], prototypes.feature_std[e])
    return features


def tsne_2d(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE embedding of points ([n, d]) in 2-D with scikit-learn (imported here); [n, 2]."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (len(points) - 1) / 3)))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(points)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DiagnoseRequest:
    """Everything ``protoalign diagnose`` was asked to do."""

    prototypes: Path
    configs: Sequence[Path]
    out: Path
    model: Path | None = None
    model_head: str | None = None
    foundation_model: str | None = None
    energy_key: str | None = None  # None: REF_energy, and a missing key skips the predictor
    map_method: str = "pca"
    radius_factor: float = DEFAULT_RADIUS_FACTOR
    spread_threshold_meV: float = DEFAULT_SPREAD_THRESHOLD_MEV
    fail_below_coverage: float | None = None
    device: str = "cpu"
    batch_size: int = 32
    overwrite: bool = False


def check_request(request: DiagnoseRequest) -> None:
    """Raise ProtoalignError for option values that cannot work (before any heavy work)."""
    if request.radius_factor <= 0:
        raise ProtoalignError("--radius-factor must be > 0")
    if request.spread_threshold_meV <= 0:
        raise ProtoalignError("--spread-threshold must be > 0 (meV)")
    if request.fail_below_coverage is not None and not 0 <= request.fail_below_coverage <= 1:
        raise ProtoalignError("--fail-below-coverage must be between 0 and 1")
    if request.batch_size < 1:
        raise ProtoalignError("--batch-size must be >= 1")
    if not request.configs:
        raise ProtoalignError("give at least one --configs file")
    if request.map_method not in ("pca", "tsne"):
        raise ProtoalignError("--map must be pca or tsne")
    if request.map_method == "tsne":
        try:
            import sklearn.manifold  # noqa: F401
        except ImportError:
            raise ProtoalignError("--map tsne needs scikit-learn (pip install scikit-learn); or use --map pca") from None
    if request.model is not None and not Path(request.model).is_file():
        raise ProtoalignError(f"fine-tuned model {request.model} does not exist")
    check_writable(Path(request.out), request.overwrite)


def resolve_foundation(prototypes, override: str | None) -> Path:
    """The pretrained model the prototypes were built with, verified by sha256.

    ``override`` replaces the path recorded in the prototype file (a file or a foundation name);
    either way the file's sha256 must equal the prototypes' ``model_sha256``.
    """
    from protoalign_cli.models import resolve_model_path
    from protoalign_cli.provenance import sha256_file

    if override is None:
        path = Path(prototypes.model_path)
        if not path.is_file():
            raise ProtoalignError(
                f"the prototypes' pretrained model {path} is not there; pass --foundation-model PATH"
            )
    else:
        path = resolve_model_path(override)
    digest = sha256_file(path)
    if digest != prototypes.model_sha256:
        raise ProtoalignError(
            f"{path} (sha256 {digest[:12]}...) is not the model the prototypes were built with "
            f"(sha256 {prototypes.model_sha256[:12]}...)"
        )
    return path


def read_targets(paths: Sequence[Path]) -> tuple[list, list[int]]:
    """Read every configuration of the target files; returns (atoms list, configurations per file)."""
    from protoalign_cli.structures import iter_structures

    atoms_list, counts = [], []
    for path in paths:
        frames = list(iter_structures(Path(path)))
        if not frames:
            raise ProtoalignError(f"{path} holds no configurations")
        atoms_list += frames
        counts.append(len(frames))
    return atoms_list, counts


def reference_energy(atoms, key: str) -> float | None:
    """The configuration's reference energy (eV) under ``key`` (info, or a calculator's results), or None."""
    if key in atoms.info:
        return float(atoms.info[key])
    results = getattr(atoms.calc, "results", None) or {}
    if key in results:
        return float(results[key])
    return None


def run_diagnose(request: DiagnoseRequest) -> dict:
    """Diagnose a target against prototypes; write report.json, report.md and figures into ``out``.

    Returns the run summary (also written as report.json) whose ``results`` hold the statistics,
    the verdict lines and ``safe``.
    """
    from protoalign_cli.extract import latents_of_atoms
    from protoalign_cli.models import describe_model, load_model
    from protoalign_cli.prototypes import assign, load_prototypes
    from protoalign_cli.provenance import run_summary, sha256_file

    check_request(request)
    prototypes = load_prototypes(Path(request.prototypes))
    foundation_path = resolve_foundation(prototypes, request.foundation_model)
    atoms_list, counts = read_targets(request.configs)
    energy_key = request.energy_key or DEFAULT_ENERGY_KEY
    references = [reference_energy(atoms, energy_key) for atoms in atoms_list]
    if request.energy_key is not None and all(e is None for e in references):
        raise ProtoalignError(f"no target configuration has the energy key {energy_key!r}")

    foundation = load_model(foundation_path, request.device, prototypes.latent_dtype)
    foundation_info = describe_model(foundation, foundation_path)
    if prototypes.head not in foundation_info.heads:
        raise ProtoalignError(f"the prototypes' head {prototypes.head!r} is not a head of {foundation_path}")
    target = latents_of_atoms(foundation, foundation_info, atoms_list, prototypes.head, request.batch_size, request.device)
    prototype_id, distance = assign(prototypes, target["latent"], target["atomic_number"])

    finetuned_eps, finetuned_info = None, None
    if request.model is not None:
        finetuned = load_model(Path(request.model), request.device)
        finetuned_info = describe_model(finetuned, Path(request.model))
        head = request.model_head or finetuned_info.heads[0]
        if head not in finetuned_info.heads:
            raise ProtoalignError(f"--model-head {head!r} is not one of the model's heads: {', '.join(finetuned_info.heads)}")
        finetuned_eps = latents_of_atoms(finetuned, finetuned_info, atoms_list, head, request.batch_size,
                                         request.device)["energy_minus_e0"]

    statistics, arrays = diagnose_statistics(
        prototypes, target, prototype_id, distance, references, finetuned_eps,
        request.radius_factor, request.spread_threshold_meV,
    )
    file_of_config = np.repeat(np.arange(len(counts)), counts)
    statistics["sites"] = site_statistics(
        file_of_config[target["config_index"]], target["atom_index"], target["atomic_number"], arrays["ratio"],
        request.radius_factor, target["energy_minus_e0"] - arrays["eps_star"], fixed_molecule_files(atoms_list, counts),
    )
    inputs = {
        "prototypes": str(request.prototypes), "prototypes_sha256": sha256_file(Path(request.prototypes)),
        "configs": [str(p) for p in request.configs], "configs_per_file": counts,
        "foundation_model": str(foundation_path), "foundation_model_sha256": prototypes.model_sha256,
        "head": prototypes.head, "model": str(request.model) if request.model else None,
        "model_sha256": finetuned_info.sha256 if finetuned_info else None,
        "model_head": (request.model_head or finetuned_info.heads[0]) if finetuned_info else None,
        "energy_key": energy_key, "radius_factor": request.radius_factor,
        "spread_threshold_meV": request.spread_threshold_meV, "map": request.map_method,
        "fail_below_coverage": request.fail_below_coverage,
    }
    summary = run_summary("diagnose", inputs, statistics)
    with atomic_directory(Path(request.out), request.overwrite) as folder:
        summary["results"]["figures"] = write_figures(folder, prototypes, target, prototype_id, arrays,
                                                      statistics, request.map_method)
        write_report(folder, summary)
    return summary


def diagnose_statistics(prototypes, target: dict, prototype_id: np.ndarray, distance: np.ndarray,
                        references: Sequence[float | None], finetuned_eps: np.ndarray | None,
                        radius_factor: float, spread_threshold_meV: float) -> tuple[dict, dict]:
    """All statistics of the report from in-memory arrays (no I/O); returns (results, arrays).

    ``target`` holds the pretrained model's per-atom arrays of the target (``latents_of_atoms``);
    ``references`` the reference energy of each configuration (eV) or None; ``finetuned_eps`` a
    fine-tuned model's per-atom energy minus its own E0 (eV) or None. ``results`` is what the
    report holds (JSON-ready); ``arrays`` the per-atom and per-configuration arrays the figures plot.
    """
    z = np.asarray(target["atomic_number"])
    n_configs = len(references)
    n_prototypes = len(prototypes.element)
    ratio = distance_ratio(distance, prototype_id, prototypes.radius)
    coverage_table = element_coverage(z, ratio, radius_factor, np.unique(prototypes.element))
    n_covered = sum(row["n_covered"] for row in coverage_table.values())
    assigned = prototype_id >= 0
    eps_star = np.where(assigned, np.asarray(prototypes.energy_mean)[np.maximum(prototype_id, 0)], np.nan)
    usage = prototype_usage(prototype_id, n_prototypes)
    for z_value, row in coverage_table.items():
        mine = np.asarray(prototypes.element) == z_value
        row["n_prototypes"] = int(mine.sum())
        row["n_prototypes_used"] = int(np.count_nonzero(usage[mine]))
    predictor, beyond = predictor_results(prototypes, target, eps_star, references)

    results = {
        "n_configs": n_configs,
        "n_atoms": int(len(z)),
        "coverage": {
            "radius_factor": radius_factor,
            "overall": n_covered / len(z),
            "n_covered": n_covered,
            "by_element": {symbol(k): v for k, v in coverage_table.items()},
        },
        "prototype_usage": usage_rows(prototypes, usage),
        "energy_predictor": predictor,
        "atom_energies": {"pretrained": None, "finetuned": None},
        "spread": spread_results(prototypes, usage, spread_threshold_meV),
    }
    if assigned.any():
        member_std = np.asarray(prototypes.energy_std)[prototype_id[assigned]]
        results["atom_energies"]["pretrained"] = {
            "by_element": {symbol(k): v for k, v in atom_energy_agreement(
                z[assigned], target["energy_minus_e0"][assigned], eps_star[assigned], member_std).items()},
        }
        if finetuned_eps is not None:
            results["atom_energies"]["finetuned"] = finetuned_results(
                prototypes, z[assigned], prototype_id[assigned], finetuned_eps[assigned], eps_star[assigned])
    arrays = {"ratio": ratio, "eps_star": eps_star, "finetuned_eps": finetuned_eps, "beyond_composition_eV": beyond}
    verdict, safe = verdict_lines(results)
    results["verdict"], results["safe"] = verdict, safe
    return results, arrays


def symbol(z: int) -> str:
    """Chemical symbol of an atomic number."""
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def usage_rows(prototypes, usage: np.ndarray) -> list[dict]:
    """One row per prototype: element, source and target counts, energy mean/std, radius."""
    total = max(int(usage.sum()), 1)
    return [
        {
            "prototype": p, "element": symbol(prototypes.element[p]), "source_count": int(prototypes.count[p]),
            "target_count": int(usage[p]), "target_fraction": int(usage[p]) / total,
            "energy_mean_eV": float(prototypes.energy_mean[p]), "energy_std_meV": float(prototypes.energy_std[p]) * 1000,
            "radius": float(prototypes.radius[p]),
        }
        for p in range(len(prototypes.element))
    ]


def predictor_results(prototypes, target: dict, eps_star: np.ndarray,
                      references: Sequence[float | None]) -> tuple[dict, dict | None]:
    """Prototype predictor, composition-only baseline and pretrained model against reference energies.

    Configurations without a reference energy, or with an atom of an element that has no
    prototype, are left out (counted in the note). Returns (statistics, energies beyond
    composition in eV of the reference and of each predictor, for the figure; None if skipped).
    """
    z = np.asarray(target["atomic_number"])
    config_index = np.asarray(target["config_index"])
    n_configs = len(references)
    has_reference = np.array([e is not None for e in references])
    if not has_reference.any():
        return {"available": False, "note": "no reference energies in the target (see --energy-key); predictor skipped"}, None
    unassigned = per_config_sum(config_index, np.isnan(eps_star).astype(float), n_configs) > 0
    usable = has_reference & ~unassigned
    note = []
    if (~has_reference).any():
        note.append(f"{int((~has_reference).sum())} configurations without reference energy left out")
    if (has_reference & unassigned).any():
        note.append(f"{int((has_reference & unassigned).sum())} configurations with an element without prototypes left out")
    if not usable.any():
        return {"available": False, "note": "; ".join(note) + "; predictor skipped"}, None
    e0 = schema.e0_per_atom(prototypes.e0s, prototypes.head, z)
    elements = sorted(set(int(v) for v in z))
    composition = composition_matrix(config_index, z, elements, n_configs)[usable]
    reference = np.array([e if e is not None else np.nan for e in references])[usable]
    candidates = {  # keys as in PREDICTORS
        "prototype": per_config_sum(config_index, e0 + np.nan_to_num(eps_star), n_configs)[usable],
        "composition_only": per_config_sum(config_index, e0, n_configs)[usable],
        "pretrained_model": per_config_sum(config_index, target["node_energy"], n_configs)[usable],
    }
    results = {"available": True, "note": "; ".join(note), "elements": [symbol(v) for v in elements],
               "rank": int(np.linalg.matrix_rank(composition))}
    beyond = {"reference": beyond_composition(reference, composition)}
    for name, predicted in candidates.items():
        stats = offset_corrected_errors(predicted, reference, composition)
        stats["offsets_eV"] = {symbol(v): float(o) for v, o in zip(elements, stats["offsets_eV"])}
        results[name] = stats
        beyond[name] = beyond_composition(predicted, composition)
    return results, beyond


def finetuned_results(prototypes, z: np.ndarray, prototype_id: np.ndarray, eps: np.ndarray, eps_star: np.ndarray) -> dict:
    """Fine-tuned eps_i against eps*_p(i): per element, and the prototypes whose target atoms disagree most.

    The per-prototype disagreement is the mean |eps_i - eps*_p - bias_Z| (meV), bias_Z the
    per-element mean difference, so that a re-estimated E0 does not dominate the ranking.
    """
    n_prototypes = len(prototypes.element)
    difference = eps - eps_star
    abs_corrected = np.abs(difference - element_bias(z, difference))
    disagreement = prototype_disagreement(prototype_id, abs_corrected, n_prototypes)
    usage = prototype_usage(prototype_id, n_prototypes)
    order = [int(p) for p in np.argsort(-np.nan_to_num(disagreement, nan=-1.0)) if usage[p] > 0]
    worst = [
        {"prototype": p, "element": symbol(prototypes.element[p]), "target_count": int(usage[p]),
         "mean_abs_difference_meV": float(disagreement[p]) * 1000,
         "energy_std_meV": float(prototypes.energy_std[p]) * 1000}
        for p in order[:WORST_PROTOTYPES_SHOWN]
    ]
    by_element = atom_energy_agreement(z, eps, eps_star, np.asarray(prototypes.energy_std)[prototype_id])
    return {"by_element": {symbol(k): v for k, v in by_element.items()}, "worst_prototypes": worst}


def spread_results(prototypes, usage: np.ndarray, threshold_meV: float) -> dict:
    """Prototypes whose member energy std exceeds the threshold, and the target atoms they hold."""
    flagged = wide_prototypes(prototypes.energy_std, threshold_meV / 1000)
    total = max(int(usage.sum()), 1)
    return {
        "threshold_meV": threshold_meV,
        "n_flagged": int(len(flagged)),
        "flagged": [
            {"prototype": int(p), "element": symbol(prototypes.element[p]),
             "energy_std_meV": float(prototypes.energy_std[p]) * 1000,
             "source_count": int(prototypes.count[p]), "target_count": int(usage[p])}
            for p in flagged[np.argsort(-np.asarray(prototypes.energy_std)[flagged])]
        ],
        "target_fraction_in_flagged": float(usage[flagged].sum()) / total,
    }


def verdict_lines(results: dict) -> tuple[list[str], bool]:
    """One line per element and an overall line; and whether the alignment looks safe.

    Safe means: overall coverage >= SAFE_COVERAGE; every target element has prototypes; for every
    element, the pretrained model's atom energies scatter around their prototype energies at most
    SAFE_SCATTER_RATIO times as much as the source members do, and their mean shift (bias) is
    within SAFE_SCATTER_RATIO times the members' spread; with a fine-tuned model, its scatter
    ratio too (its bias is reported, not judged: re-estimated E0s shift it per element). The
    prototype predictor does not decide SAFE/RISKY (see docs/diagnose.md); when it does no better
    than composition alone, the overall line adds that no gain in energy error is to be expected.
    """
    coverage = results["coverage"]
    pretrained = (results["atom_energies"]["pretrained"] or {}).get("by_element", {})
    finetuned = (results["atom_energies"]["finetuned"] or {}).get("by_element", {})
    reasons, lines = [], []
    for name, row in coverage["by_element"].items():
        if not row["has_prototypes"]:
            lines.append(f"{name}: no prototypes for this element ({row['n_atoms']} atoms) -> out of distribution")
            reasons.append(f"{name} has no prototypes")
            continue
        text = (f"{name}: coverage {row['coverage']:.3f} ({row['n_covered']}/{row['n_atoms']} atoms within "
                f"{coverage['radius_factor']:g} x radius)")
        for label, table in (("pretrained", pretrained), ("fine-tuned", finetuned)):
            if name not in table:
                continue
            agreement = table[name]
            text += (f"; {label} eps - eps*: bias {agreement['bias_meV']:+.0f} meV, scatter {agreement['rms_meV']:.0f} meV"
                     f" = {_number(agreement['scatter_ratio'], 2)} x source")
            if agreement["scatter_ratio"] is not None and agreement["scatter_ratio"] > SAFE_SCATTER_RATIO:
                reasons.append(f"{name} {label} atom energies scatter more than {SAFE_SCATTER_RATIO:g} x source")
            if (label == "pretrained" and agreement["bias_ratio"] is not None
                    and agreement["bias_ratio"] > SAFE_SCATTER_RATIO):
                reasons.append(f"{name} atom energies are shifted from their prototypes by more than "
                               f"{SAFE_SCATTER_RATIO:g} x source spread")
        lines.append(text)
    overall = f"overall: coverage {coverage['overall']:.3f} ({coverage['n_covered']}/{results['n_atoms']} atoms)"
    if coverage["overall"] < SAFE_COVERAGE:
        reasons.append(f"coverage below {SAFE_COVERAGE:g}")
    predictor = results["energy_predictor"]
    if predictor["available"]:
        proto, base = predictor["prototype"], predictor["composition_only"]
        overall += (f"; prototype predictor MAE {proto['mae_meV']:.0f} meV ({proto['mae_meV_per_atom']:.1f} meV/atom, "
                    f"r {_number(proto['pearson_beyond_composition'], 2)}) vs composition-only {base['mae_meV']:.0f} meV")
    else:
        overall += f"; predictor not measured ({predictor['note']})"
    safe = not reasons
    overall += "; alignment looks SAFE" if safe else "; alignment looks RISKY: " + "; ".join(reasons)
    if predictor["available"] and predictor["prototype"]["mae_meV"] >= predictor["composition_only"]["mae_meV"]:
        overall += ("; the prototype energies predict the target energies no better than composition alone: "
                    "expect no gain in energy error from alignment")
    return lines + [overall], safe


# ----------------------------------------------------------------------------------------------
# Output: folder, figures, report
# ----------------------------------------------------------------------------------------------

def _figure(n_panels: int, panel_inches: float = 3.2):
    from matplotlib.figure import Figure

    columns = min(n_panels, 4)
    rows = -(-n_panels // columns)
    figure = Figure(figsize=(panel_inches * columns, panel_inches * rows), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes[:n_panels]


def write_figures(folder: Path, prototypes, target: dict, prototype_id: np.ndarray, arrays: dict,
                  results: dict, map_method: str) -> list[str]:
    """Write the PNG figures into ``folder``; return their file names."""
    written = []
    z = np.asarray(target["atomic_number"])
    elements = sorted(set(int(v) for v in z))
    written.append(plot_map(folder / "map.png", prototypes, target["latent"], z, prototype_id, arrays["ratio"],
                            results["coverage"]["radius_factor"], map_method))
    written.append(plot_ratios(folder / "distance_ratio.png", z, elements, arrays["ratio"],
                               results["coverage"]))
    if results["energy_predictor"]["available"]:
        written.append(plot_predictor(folder / "predictor.png", arrays["beyond_composition_eV"],
                                      results["energy_predictor"]))
    if arrays["finetuned_eps"] is not None and results["atom_energies"]["finetuned"] is not None:
        assigned = prototype_id >= 0
        written.append(plot_atom_energies(folder / "atom_energies.png", z[assigned], arrays["eps_star"][assigned],
                                          arrays["finetuned_eps"][assigned], results["atom_energies"]["finetuned"]))
    return [path.name for path in written]


def plot_map(path: Path, prototypes, latent: np.ndarray, z: np.ndarray, prototype_id: np.ndarray,
             ratio: np.ndarray, radius_factor: float, method: str, seed: int = 0) -> Path:
    """Per target element, a 2-D map (PCA or t-SNE, fitted on centroids and target atoms together)
    of the prototype centroids (stars, numbered) and the target atoms (dots coloured by their
    prototype; grey crosses: not covered), in the prototypes' standardized feature space."""
    from matplotlib import colormaps

    rng = np.random.default_rng(seed)
    elements = sorted(set(int(v) for v in z))
    figure, axes = _figure(len(elements))
    features = standardized_features(prototypes, latent, z)
    for ax, element in zip(axes, elements):
        mine = np.flatnonzero(np.asarray(prototypes.element) == element)
        palette = colormaps["tab10" if len(mine) <= 10 else "tab20"]
        atoms = np.flatnonzero(z == element)
        if len(atoms) > MAP_POINTS_PER_ELEMENT:
            atoms = np.sort(rng.choice(atoms, MAP_POINTS_PER_ELEMENT, replace=False))
        points = np.vstack([np.asarray(prototypes.centroid)[mine], features[atoms]])
        if not len(mine):
            ax.text(0.5, 0.5, f"no prototypes for {symbol(element)}:\nevery target atom is uncovered", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
        elif len(points) < 3:
            ax.text(0.5, 0.5, "too few points to map", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        else:
            xy = tsne_2d(points, seed) if method == "tsne" else pca_2d(points)
            centroids_xy, atoms_xy = xy[: len(mine)], xy[len(mine):]
            covered = ratio[atoms] <= radius_factor
            local = np.searchsorted(mine, prototype_id[atoms]) if len(mine) else np.zeros(len(atoms), int)
            ax.scatter(atoms_xy[covered, 0], atoms_xy[covered, 1], s=4, c=palette(local[covered] % palette.N),
                       alpha=0.6, linewidths=0)
            ax.scatter(atoms_xy[~covered, 0], atoms_xy[~covered, 1], s=10, c="0.4", marker="x", linewidths=0.6,
                       label="not covered")
            ax.scatter(centroids_xy[:, 0], centroids_xy[:, 1], s=90, c=palette(np.arange(len(mine)) % palette.N),
                       marker="*", edgecolors="k", linewidths=0.7, label="prototype")
            for p, (x, y) in zip(mine, centroids_xy):
                ax.annotate(str(p), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.legend(fontsize=6, loc="best")
        ax.set_title(f"{symbol(element)}: {len(mine)} prototypes, {int((z == element).sum())} target atoms",
                     fontsize=8)
        ax.set_xlabel(f"{method.upper()} 1", fontsize=7)
        ax.set_ylabel(f"{method.upper()} 2", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.savefig(path)
    return path


def plot_ratios(path: Path, z: np.ndarray, elements: Sequence[int], ratio: np.ndarray, coverage: dict) -> Path:
    """Per element, a histogram of target atoms' distance / radius of their nearest prototype.

    Values beyond the plotted range are gathered in the last bin; the dashed line is the radius
    factor (covered to its left), the dotted one a ratio of 1 (the radius itself).
    """
    factor = coverage["radius_factor"]
    finite = ratio[np.isfinite(ratio)]
    limit = max(2 * factor, min(float(np.ceil(np.percentile(finite, 99))) if len(finite) else 0.0, 10.0))
    figure, axes = _figure(len(elements))
    for ax, element in zip(axes, elements):
        row = coverage["by_element"][symbol(element)]
        values = ratio[z == element]
        if not row["has_prototypes"]:
            ax.text(0.5, 0.5, f"no prototypes for {symbol(element)}\n({row['n_atoms']} atoms)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
        else:
            ax.hist(np.minimum(values, limit), bins=60, range=(0, limit), color="tab:blue")
            ax.axvline(1.0, color="k", linestyle=":", linewidth=0.8)
            ax.axvline(factor, color="tab:red", linestyle="--", linewidth=1.0)
        ax.set_title(f"{symbol(element)}: coverage {row['coverage']:.3f}", fontsize=8)
        ax.set_xlabel(f"distance / radius (last bin: >= {limit:g})", fontsize=7)
        ax.set_ylabel("target atoms", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.savefig(path)
    return path


def plot_predictor(path: Path, beyond: dict, predictor: dict) -> Path:
    """Prototype predictor (and pretrained model) against reference energies, both beyond
    composition (less their per-element offset fits; for one molecule: less their mean), in eV.

    The vertical distance of a point to the diagonal is its offset-corrected error; the
    composition-only baseline predicts 0 beyond composition (the dashed line).
    """
    figure, (ax,) = _figure(1, panel_inches=4.0)
    x = beyond["reference"]
    ax.scatter(x, beyond["pretrained_model"], s=5, c="0.6", linewidths=0,
               label=f"pretrained model (MAE {predictor['pretrained_model']['mae_meV']:.0f} meV)")
    ax.scatter(x, beyond["prototype"], s=6, c="tab:blue", linewidths=0,
               label=f"prototype predictor (MAE {predictor['prototype']['mae_meV']:.0f} meV)")
    span = [min(x.min(), ax.get_ylim()[0]), max(x.max(), ax.get_ylim()[1])]
    ax.plot(span, span, "k-", linewidth=0.6)
    ax.axhline(0, color="tab:red", linestyle="--", linewidth=0.8,
               label=f"composition only (MAE {predictor['composition_only']['mae_meV']:.0f} meV)")
    r = predictor["prototype"]["pearson_beyond_composition"]
    ax.set_title(f"{predictor['prototype']['n_configs']} configurations, prototype predictor r = "
                 f"{'n/a' if r is None else f'{r:.2f}'}", fontsize=8)
    ax.set_xlabel("reference energy beyond composition (eV)", fontsize=7)
    ax.set_ylabel("predicted energy beyond composition (eV)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left")
    figure.savefig(path)
    return path


def plot_atom_energies(path: Path, z: np.ndarray, eps_star: np.ndarray, eps: np.ndarray, finetuned: dict) -> Path:
    """Per element, the fine-tuned model's atom energy minus E0 (less the element's bias) against
    the assigned prototype's mean energy (eV)."""
    elements = sorted(set(int(v) for v in z))
    figure, axes = _figure(len(elements))
    for ax, element in zip(axes, elements):
        mask = z == element
        row = finetuned["by_element"][symbol(element)]
        shifted = eps[mask] - row["bias_meV"] / 1000
        ax.scatter(eps_star[mask], shifted, s=4, alpha=0.4, linewidths=0)
        span = [min(eps_star[mask].min(), shifted.min()), max(eps_star[mask].max(), shifted.max())]
        ax.plot(span, span, "k-", linewidth=0.6)
        r = row["pearson"]
        ax.set_title(f"{symbol(element)}: MAE {row['mae_meV']:.0f} meV, r {'n/a' if r is None else f'{r:.2f}'}, "
                     f"bias {row['bias_meV']:+.0f} meV", fontsize=8)
        ax.set_xlabel("prototype energy eps*_p (eV)", fontsize=7)
        ax.set_ylabel("fine-tuned eps_i - bias (eV)", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.savefig(path)
    return path


def write_report(folder: Path, summary: dict) -> None:
    """Write ``report.json`` (the run summary) and ``report.md`` (the same, for people) into ``folder``."""
    from protoalign_cli.provenance import write_summary

    write_summary(folder / "report.json", summary)
    (folder / "report.md").write_text(render_markdown(summary))


def _number(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(summary: dict) -> str:
    """The report as Markdown: inputs, verdict, tables and the figures."""
    inputs, results = summary["inputs"], summary["results"]
    coverage = results["coverage"]
    lines = [
        "# protoalign diagnose report", "",
        f"- prototypes: `{inputs['prototypes']}` (sha256 {inputs['prototypes_sha256'][:12]}...)",
        f"- target: {', '.join(f'`{c}`' for c in inputs['configs'])} ({results['n_configs']} configurations, "
        f"{results['n_atoms']} atoms)",
        f"- pretrained model: `{inputs['foundation_model']}` (sha256 {inputs['foundation_model_sha256'][:12]}...), "
        f"head {inputs['head']}",
        f"- fine-tuned model: {'`' + inputs['model'] + '`, head ' + inputs['model_head'] if inputs['model'] else 'none'}",
        f"- energy key: {inputs['energy_key']}; radius factor {inputs['radius_factor']:g}; spread threshold "
        f"{inputs['spread_threshold_meV']:g} meV",
        f"- command: `{summary['command_line']}`", "",
        "## Verdict", "", "```", *results["verdict"], "```", "",
        "## Coverage", "",
        f"An atom is covered when its distance to the nearest prototype of its element is at most "
        f"{coverage['radius_factor']:g} x that prototype's radius (95th percentile of the source members' distances).", "",
        "| element | atoms | covered | coverage | ratio p50 | ratio p90 | ratio p99 | ratio max | prototypes used |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in coverage["by_element"].items():
        q = row["ratio_quantiles"]
        lines.append(f"| {name} | {row['n_atoms']} | {row['n_covered']} | {row['coverage']:.3f} | "
                     f"{_number(q.get('p50'), 2)} | {_number(q.get('p90'), 2)} | {_number(q.get('p99'), 2)} | "
                     f"{_number(row['ratio_max'], 2)} | {row['n_prototypes_used']} of {row['n_prototypes']} |")
    lines.append(f"| all | {results['n_atoms']} | {coverage['n_covered']} | {coverage['overall']:.3f} | | | | | |")
    if results.get("sites"):
        lines += ["", "## Sites", "",
                  "Per atom position of the fixed-molecule target files: coverage over the configurations, median "
                  "distance ratio, and the mean pretrained eps_i - eps*_p(i).", "",
                  "| file | atom | element | configs | coverage | median ratio | pretrained eps - eps* (meV) |",
                  "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['file']} | {row['atom_index']} | {row['element']} | {row['n_configs']} | {row['coverage']:.3f} | "
                  f"{_number(row['ratio_median'], 2)} | {_number(row['pretrained_bias_meV'], 0)} |"
                  for row in results["sites"]]
    lines += ["", "## Energy consistency: prototype predictor", ""]
    predictor = results["energy_predictor"]
    if not predictor["available"]:
        lines.append(f"Not measured: {predictor['note']}.")
    else:
        lines += [
            "E_pred = sum_i (E0 + eps*_p(i)) compared with the reference energies after least-squares per-element "
            f"offsets (composition rank {predictor['rank']}). {predictor['note']}", "",
            "| predictor | configs | MAE raw (meV) | MAE (meV) | MAE (meV/atom) | RMSE (meV) | Pearson r | r beyond composition |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in PREDICTORS:
            row = predictor[name]
            lines.append(f"| {name.replace('_', ' ')} | {row['n_configs']} | {row['mae_raw_meV']:.0f} | "
                         f"{row['mae_meV']:.1f} | {row['mae_meV_per_atom']:.2f} | {row['rmse_meV']:.1f} | "
                         f"{_number(row['pearson'], 3)} | {_number(row['pearson_beyond_composition'], 3)} |")
    lines += ["", "## Energy consistency: atom energies against prototype energies", "",
              "eps_i = a model's atom energy minus its own E0; bias = mean(eps_i - eps*_p(i)) per element; "
              "MAE = mean |eps_i - eps*_p(i) - bias|; scatter RMS = RMS of eps_i - eps*_p(i) - bias; source spread = "
              "RMS of the assigned prototypes' member energy std (what the scatter RMS is for the source atoms); "
              "scatter ratio = scatter RMS / source spread; bias ratio = |bias| / source spread.", ""]
    for label in ("pretrained", "finetuned"):
        table = results["atom_energies"][label]
        if table is None:
            lines += [f"{label}: not measured" + (" (no --model)" if label == "finetuned" else "") + ".", ""]
            continue
        lines += [f"**{label}**", "",
                  "| element | atoms | bias (meV) | MAE (meV) | MAE raw (meV) | scatter RMS (meV) | source spread (meV) "
                  "| scatter ratio | bias ratio | Pearson r |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in table["by_element"].items():
            lines.append(f"| {name} | {row['n_atoms']} | {row['bias_meV']:+.1f} | {row['mae_meV']:.1f} | "
                         f"{row['mae_raw_meV']:.1f} | {row['rms_meV']:.1f} | {row['source_rms_std_meV']:.1f} | "
                         f"{_number(row['scatter_ratio'], 2)} | {_number(row['bias_ratio'], 2)} | "
                         f"{_number(row['pearson'], 3)} |")
        lines.append("")
        if "worst_prototypes" in table:
            lines += ["Prototypes whose target atoms disagree most (mean |eps_i - eps*_p - bias|):", "",
                      "| prototype | element | target atoms | mean abs difference (meV) | source energy std (meV) |",
                      "| ---: | --- | ---: | ---: | ---: |"]
            lines += [f"| {row['prototype']} | {row['element']} | {row['target_count']} | "
                      f"{row['mean_abs_difference_meV']:.1f} | {row['energy_std_meV']:.1f} |"
                      for row in table["worst_prototypes"]]
            lines.append("")
    spread = results["spread"]
    lines += ["## Spread", "",
              f"{spread['n_flagged']} prototypes have a member energy std above {spread['threshold_meV']:g} meV; "
              f"they hold {spread['target_fraction_in_flagged']:.1%} of the target atoms.", ""]
    if spread["flagged"]:
        lines += ["| prototype | element | energy std (meV) | source atoms | target atoms |",
                  "| ---: | --- | ---: | ---: | ---: |"]
        lines += [f"| {row['prototype']} | {row['element']} | {row['energy_std_meV']:.1f} | {row['source_count']} | "
                  f"{row['target_count']} |" for row in spread["flagged"]]
        lines.append("")
    lines += ["## Prototype usage", "",
              "| prototype | element | source atoms | target atoms | target share | eps* (eV) | std (meV) | radius |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['prototype']} | {row['element']} | {row['source_count']} | {row['target_count']} | "
              f"{row['target_fraction']:.1%} | {row['energy_mean_eV']:.3f} | {row['energy_std_meV']:.1f} | "
              f"{row['radius']:.2f} |" for row in results["prototype_usage"]]
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in results.get("figures", [])]
    return "\n".join(lines) + "\n"
