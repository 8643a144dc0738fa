"""Pure statistics of a bench: error metrics, mean ± sd, paired % differences, selection by validation."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError

SELECTION_CRITERIA = {"valid_energy_mae_mev": "validation energy MAE",
                      "valid_energy_mae_shifted_mev": "validation energy MAE without its mean (constant offset)"}
SELECTION_SCOPES = ("run", "budget")


def error_metrics(pred_energy: np.ndarray, ref_energy: np.ndarray, n_atoms: np.ndarray,
                  pred_forces: np.ndarray, ref_forces: np.ndarray) -> dict[str, float]:
    """Energy MAE/RMSE in meV and meV/atom, force MAE/RMSE in meV/Å (all components).

    Energies [n_configs] in eV, ``n_atoms`` [n_configs], forces [n_atoms_total, 3] in eV/Å.
    """
    energy_error = 1000.0 * (np.asarray(pred_energy) - np.asarray(ref_energy))
    per_atom = energy_error / np.asarray(n_atoms)
    force_error = 1000.0 * (np.asarray(pred_forces) - np.asarray(ref_forces)).ravel()
    return {
        "energy_mae_mev": float(np.mean(np.abs(energy_error))),
        "energy_rmse_mev": float(np.sqrt(np.mean(energy_error ** 2))),
        "energy_mae_mev_per_atom": float(np.mean(np.abs(per_atom))),
        "energy_rmse_mev_per_atom": float(np.sqrt(np.mean(per_atom ** 2))),
        "force_mae_mev_per_a": float(np.mean(np.abs(force_error))),
        "force_rmse_mev_per_a": float(np.sqrt(np.mean(force_error ** 2))),
    }


def valid_shifted_energy_mae(test_energy_error: np.ndarray, valid_energy_error: np.ndarray) -> float:
    """Test energy MAE after removing the model's mean validation error (meV in, meV out).

    A constant energy offset is the part of the error a fine-tuned model learns slowest when all
    training data share one composition; shifting by the validation mean (never the test set's)
    shows the error without it.
    """
    return float(np.mean(np.abs(np.asarray(test_energy_error) - np.mean(valid_energy_error))))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1: nan for a single value); (nan, nan) when empty."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def paired_percent_differences(values: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """Per-seed relative difference 100 (value - baseline) / baseline over seeds present in both."""
    return [100.0 * (values[s] - baseline[s]) / baseline[s] for s in sorted(values) if s in baseline]


def select_by_validation(rows: Sequence[dict], candidates: Sequence[str], scope: str,
                         by: str = "valid_energy_mae_mev") -> list[dict]:
    """Pick, among candidate methods' rows, the lowest validation error ``by`` (meV) per (N, seed) or per N.

    ``rows`` are runs.csv rows (dicts with method, n_train, seed and the column ``by``, one of
    SELECTION_CRITERIA). With scope 'run' each (N, seed) takes its own best candidate; with
    'budget' each N takes the candidate with the lowest mean over its seeds, and all that
    candidate's seeds. Returns the chosen rows (copies) with ``chosen`` set to the candidate's
    name. The test set is never used.
    """
    pool = [r for r in rows if r["method"] in candidates]
    if scope == "run":
        chosen = _best_per_run(pool, candidates, by)
    elif scope == "budget":
        chosen = _best_per_budget(pool, candidates, by)
    else:
        raise ProtoalignError(f"unknown selection scope {scope!r}")
    return [{**r, "chosen": r["method"]} for r in chosen]


def _best_per_run(pool: Sequence[dict], candidates: Sequence[str], by: str) -> list[dict]:
    """Per (N, seed), the candidate row with the lowest ``by`` (ties: the earlier candidate)."""
    chosen = []
    for key in sorted({(r["n_train"], r["seed"]) for r in pool}):
        group = [r for r in pool if (r["n_train"], r["seed"]) == key]
        chosen.append(min(group, key=lambda r: (r[by], candidates.index(r["method"]))))
    return chosen


def _best_per_budget(pool: Sequence[dict], candidates: Sequence[str], by: str) -> list[dict]:
    """Per N, every row of the candidate with the lowest mean ``by`` over its seeds."""
    chosen = []
    for n in sorted({r["n_train"] for r in pool}):
        group = [r for r in pool if r["n_train"] == n]
        means = {m: np.mean([r[by] for r in group if r["method"] == m])
                 for m in candidates if any(r["method"] == m for r in group)}
        best = min(means, key=lambda m: (means[m], candidates.index(m)))
        chosen += [r for r in group if r["method"] == best]
    return chosen
