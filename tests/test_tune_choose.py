"""tune's choice on hand-made task records: the criterion, the ranking, ties, weights, folds, refusals."""

from __future__ import annotations

import math

import pytest

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune.choose import criterion_score, fold_order, rank_candidates


def record(candidate: str, energy: float, force: float, fold: str = "holdout", **extra) -> dict:
    """A done.json record of one validation task (energy MAE in meV, force MAE in meV/Å)."""
    return {"candidate": candidate, "fold": fold, "kind": "naive", "setting": extra.pop("setting", ""),
            "n_train": 20, "n_valid": 5, "valid_energy_mae_mev": energy,
            "valid_energy_mae_per_atom_mev": None if energy is None else energy / 9,
            "valid_force_mae_mev_per_a": force, "valid_energy_mean_error_mev": 0.0,
            "best_epoch": extra.pop("best_epoch", 4), "epochs_run": 10, "wall_time_s": extra.pop("wall_time_s", 10.0),
            **extra}


def names(ranked) -> list[str]:
    return [result.name for result in ranked]


def test_the_score_is_the_weighted_mean_of_the_errors_relative_to_the_best():
    assert criterion_score(10.0, 20.0, 10.0, 20.0, 1.0, 1.0) == pytest.approx(1.0)
    assert criterion_score(11.0, 20.0, 10.0, 20.0, 1.0, 1.0) == pytest.approx(1.05)
    # 10 % more energy error costs as much as 10 % more force error with equal weights
    assert criterion_score(11.0, 20.0, 10.0, 20.0, 1, 1) == pytest.approx(criterion_score(10.0, 22.0, 10.0, 20.0, 1, 1))
    assert criterion_score(12.0, 30.0, 10.0, 20.0, 3.0, 1.0) == pytest.approx((3 * 1.2 + 1.5) / 4)
    assert criterion_score(12.0, 30.0, 10.0, 20.0, 0.0, 2.0) == pytest.approx(1.5)


@pytest.mark.parametrize("args", [(10, 20, 10, 20, -1, 1), (10, 20, 10, 20, 0, 0), (10, 20, 0, 20, 1, 1)])
def test_the_score_refuses_negative_weights_and_a_zero_best(args):
    with pytest.raises(ProtoalignError):
        criterion_score(*args)


def test_lowest_score_wins_and_the_numbers_are_those_of_the_records():
    ranked = rank_candidates([record("a", 12.0, 30.0, setting="--lr 0.001", wall_time_s=7.5, best_epoch=3),
                              record("b", 10.0, 33.0), record("c", 15.0, 29.0)], 1.0, 1.0)
    # E_best = 10 (b), F_best = 29 (c): b (10/10 + 33/29) / 2 < a (12/10 + 30/29) / 2 < c (15/10 + 29/29) / 2
    assert names(ranked) == ["b", "a", "c"]
    assert [r.score for r in ranked] == pytest.approx([(1 + 33 / 29) / 2, (1.2 + 30 / 29) / 2, (1.5 + 1) / 2])
    a = ranked[1]
    assert (a.setting, a.n_folds, a.valid_energy_mae_mev, a.valid_force_mae_mev_per_a, a.wall_time_s, a.best_epochs) \
        == ("--lr 0.001", 1, 12.0, 30.0, 7.5, (3,))
    assert math.isnan(a.valid_energy_sd_mev) and math.isnan(a.valid_force_sd_mev_per_a)  # one fold: no sd


def test_weights_change_the_winner():
    records = [record("energy_good", 10.0, 40.0), record("forces_good", 12.0, 30.0)]
    assert names(rank_candidates(records, 1.0, 1.0)) == ["forces_good", "energy_good"]
    assert names(rank_candidates(records, 3.0, 1.0)) == ["energy_good", "forces_good"]
    assert names(rank_candidates(records, 1.0, 0.0)) == ["energy_good", "forces_good"]


def test_ties_go_to_the_earlier_name():
    records = [record("zeta", 10.0, 20.0), record("alpha", 10.0, 20.0), record("mid", 10.0, 20.0)]
    ranked = rank_candidates(records, 1.0, 1.0)
    assert names(ranked) == ["alpha", "mid", "zeta"] and {r.score for r in ranked} == {1.0}


def test_folds_give_the_mean_and_sd_and_the_retrain_is_left_out():
    records = [record("a", e, f, fold=fold, best_epoch=epoch, wall_time_s=10.0)
               for fold, e, f, epoch in [("fold2", 12.0, 30.0, 6), ("fold1", 10.0, 28.0, 5),
                                         ("fold3", 14.0, 35.0, None)]]
    records += [record("b", 11.0, 40.0, fold=f"fold{i}") for i in (1, 2, 3)]
    records.append(record("a", math.nan, math.nan, fold="all", best_epoch=None))
    a = next(r for r in rank_candidates(records, 1.0, 1.0) if r.name == "a")
    assert a.n_folds == 3
    assert a.valid_energy_mae_mev == pytest.approx(12.0) and a.valid_energy_sd_mev == pytest.approx(2.0)
    assert a.valid_force_mae_mev_per_a == pytest.approx(31.0) and a.valid_force_sd_mev_per_a == pytest.approx(3.6055512)
    assert a.best_epochs == (5, 6, None)  # fold order, not record order
    assert a.wall_time_s == pytest.approx(30.0)


def test_fold_names_sort_by_number():
    assert sorted(["fold10", "fold2", "fold1", "holdout"], key=fold_order) == ["fold1", "fold2", "fold10", "holdout"]


def test_a_candidate_missing_a_fold_is_refused():
    records = [record("a", 10.0, 20.0, fold=f"fold{i}") for i in (1, 2, 3)]
    records += [record("b", 10.0, 20.0, fold=f"fold{i}") for i in (1, 3)]
    with pytest.raises(ProtoalignError, match="candidate b has no result for fold2"):
        rank_candidates(records, 1.0, 1.0)


@pytest.mark.parametrize("records,message", [
    ([record("a", 10.0, 20.0), record("a", 11.0, 21.0)], "fold holdout is recorded twice"),
    ([record("a", None, 20.0)], "has no valid_energy_mae_mev"),
    ([record("a", 10.0, 20.0, fold="all")], "no finished validation task"),
    ([record("a", math.nan, 20.0), record("b", 10.0, math.inf)], "no candidate has finite validation errors"),
])
def test_records_that_cannot_be_ranked_are_refused(records, message):
    with pytest.raises(ProtoalignError, match=message):
        rank_candidates(records, 1.0, 1.0)


def test_a_diverged_candidate_comes_last_and_does_not_set_the_best():
    ranked = rank_candidates([record("diverged", math.nan, 5.0), record("b", 12.0, 30.0), record("c", 10.0, 33.0)],
                             1.0, 1.0)
    assert names(ranked) == ["c", "b", "diverged"] and ranked[-1].score == math.inf
    assert ranked[0].score == pytest.approx((1.0 + 33 / 30) / 2)  # F_best is b's 30, not the diverged 5
