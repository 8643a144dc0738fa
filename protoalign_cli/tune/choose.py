"""Choosing among tune's candidates on their validation errors: the criterion and the ranking (pure, no torch).

A candidate's validation errors are the means over its folds (one fold for a single validation set) of the
energy MAE in meV per configuration and the force MAE in meV/Å, read from its tasks' done.json records.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

from protoalign_cli.bench.stats import mean_sd
from protoalign_cli.errors import ProtoalignError

RETRAIN_FOLD = "all"  # the winner's final retrain on every configuration: no validation numbers of its own


@dataclasses.dataclass(frozen=True)
class CandidateResult:
    """One candidate's validation errors over its folds and its score.

    Errors are means over folds with their sample sd (nan for one fold): energy MAE in meV per configuration,
    force MAE in meV/Å. ``wall_time_s``: seconds, summed over folds; ``best_epochs``: the epoch (0-based) of
    each fold's model as mace logged it, None where unknown, in fold order; ``score``: ``criterion_score``
    (dimensionless; inf when an error is not finite, e.g. a diverged training).
    """

    name: str
    setting: str
    n_folds: int
    valid_energy_mae_mev: float
    valid_energy_sd_mev: float
    valid_force_mae_mev_per_a: float
    valid_force_sd_mev_per_a: float
    wall_time_s: float
    best_epochs: tuple[int | None, ...]
    score: float


def criterion_score(energy_mae: float, force_mae: float, best_energy_mae: float, best_force_mae: float,
                    energy_weight: float, forces_weight: float) -> float:
    """The weighted mean of a candidate's errors relative to the best candidate's (dimensionless).

    score = (w_E E / E_best + w_F F / F_best) / (w_E + w_F), with E, E_best energy MAEs (meV per configuration)
    and F, F_best force MAEs (meV/Å); E_best and F_best are the lowest among the candidates (they may come from
    two different candidates). 1 means the best in both; with equal weights 10 % more energy error costs as
    much as 10 % more force error. Weights are >= 0, not both 0; the best errors are > 0.
    """
    if energy_weight < 0 or forces_weight < 0 or energy_weight + forces_weight <= 0:
        raise ProtoalignError(f"the criterion's weights must be >= 0 and not both 0 "
                              f"(energy {energy_weight}, forces {forces_weight})")
    if not (best_energy_mae > 0 and best_force_mae > 0):
        raise ProtoalignError(f"the lowest validation errors must be > 0 to compare candidates by them "
                              f"(energy {best_energy_mae} meV, forces {best_force_mae} meV/Å)")
    relative = energy_weight * energy_mae / best_energy_mae + forces_weight * force_mae / best_force_mae
    return relative / (energy_weight + forces_weight)


def fold_order(fold: str) -> tuple[str, int]:
    """Sort key of fold names: 'holdout', then 'fold1', 'fold2', ..., 'fold10' by number."""
    match = re.fullmatch(r"(\D*)(\d*)", fold)
    return (match.group(1), int(match.group(2) or 0)) if match else (fold, 0)


def rank_candidates(records: Sequence[dict], energy_weight: float, forces_weight: float) -> list[CandidateResult]:
    """The candidates of ``records`` (done.json dicts of validation tasks), best (lowest score) first.

    Records of the final retrain (fold 'all') are left out. Ties in score go to the earlier name in
    alphabetical order. Refused (ProtoalignError): a record without validation errors, a fold recorded twice,
    a candidate missing a fold that another candidate has, and candidates none of which has finite errors.
    """
    by_candidate: dict[str, dict[str, dict]] = {}
    for record in records:
        if record["fold"] == RETRAIN_FOLD:
            continue
        folds = by_candidate.setdefault(record["candidate"], {})
        if record["fold"] in folds:
            raise ProtoalignError(f"candidate {record['candidate']}: fold {record['fold']} is recorded twice")
        folds[record["fold"]] = record
    if not by_candidate:
        raise ProtoalignError("no finished validation task to choose from")
    all_folds = set().union(*by_candidate.values())
    for name, folds in sorted(by_candidate.items()):
        missing = sorted(all_folds - set(folds), key=fold_order)
        if missing:
            raise ProtoalignError(f"candidate {name} has no result for {', '.join(missing)}; "
                                  "finish its tasks before choosing")
    errors = {name: _mean_errors(name, folds) for name, folds in by_candidate.items()}
    finite = [e for e in errors.values() if math.isfinite(e[0][0]) and math.isfinite(e[1][0])]
    if not finite:
        raise ProtoalignError("no candidate has finite validation errors (every training diverged?)")
    best_energy, best_force = min(e[0][0] for e in finite), min(e[1][0] for e in finite)
    results = []
    for name, folds in by_candidate.items():
        (energy, energy_sd), (force, force_sd) = errors[name]
        score = (criterion_score(energy, force, best_energy, best_force, energy_weight, forces_weight)
                 if math.isfinite(energy) and math.isfinite(force) else math.inf)
        ordered = [folds[fold] for fold in sorted(folds, key=fold_order)]
        results.append(CandidateResult(
            name=name, setting=str(ordered[0].get("setting", "")), n_folds=len(ordered),
            valid_energy_mae_mev=energy, valid_energy_sd_mev=energy_sd,
            valid_force_mae_mev_per_a=force, valid_force_sd_mev_per_a=force_sd,
            wall_time_s=float(sum(r["wall_time_s"] for r in ordered)),
            best_epochs=tuple(r.get("best_epoch") for r in ordered), score=score))
    return sorted(results, key=lambda result: (result.score, result.name))


def _mean_errors(name: str, folds: dict[str, dict]) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, sd) over folds of the energy MAE (meV) and of the force MAE (meV/Å); nan means if one is nan."""
    columns = ("valid_energy_mae_mev", "valid_force_mae_mev_per_a")
    for fold, record in folds.items():
        absent = [column for column in columns if record.get(column) is None]
        if absent:
            raise ProtoalignError(f"candidate {name}, {fold}: the record has no {', '.join(absent)}")
    return tuple(mean_sd([float(r[column]) for r in folds.values()]) for column in columns)
