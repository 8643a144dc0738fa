"""tune's report on real files: report.md answers first, report.json holds the same as data, and the curves
come from a real mace_run_train log (a 2-epoch fine-tuning of the tiny model, in-process)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune.choose import rank_candidates
from protoalign_cli.tune.report import (curves_figure, epoch_values, read_eval_lines, training_curves,
                                        weights_in_words, write_report)

LOG = "results/model_run-0_train.txt"
SHA = "5" * 64


@pytest.fixture(scope="module")
def mace_log(tmp_path_factory, tiny_model, molecules_xyz) -> Path:
    """mace's per-epoch log of a real 2-epoch fine-tuning of the tiny model (name 'model', seed 0)."""
    from mace.cli import run_train

    from protoalign_cli.finetune import mace_process_state

    folder = tmp_path_factory.mktemp("mace_log")
    args = ["--name", "model", "--seed", "0", "--work_dir", str(folder), "--foundation_model", str(tiny_model),
            "--multiheads_finetuning", "False", "--train_file", str(molecules_xyz), "--valid_fraction", "0.25",
            "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--E0s", "estimated", "--max_num_epochs", "2",
            "--batch_size", "4", "--default_dtype", "float64", "--device", "cpu", "--plot", "False"]
    with mace_process_state(args):
        run_train.main()
    return folder / LOG


def record(name: str, energy: float, force: float, fold: str = "holdout", curve_of: str | None = None, **extra) -> dict:
    """A done.json record (energy MAE meV, force MAE meV/Å) whose curve is ``curve_of``'s log of this fold."""
    twin = curve_of or name
    return {"candidate": name, "fold": fold, "kind": "naive", "setting": extra.pop("setting", ""), "n_train": 18,
            "n_valid": 6, "valid_energy_mae_mev": energy, "valid_energy_mae_per_atom_mev": energy / 6,
            "valid_force_mae_mev_per_a": force, "valid_energy_mean_error_mev": 1.0, "best_epoch": 1, "epochs_run": 2,
            "wall_time_s": 12.0, "command": ["mace_run_train"], "fingerprint": "f" * 16,
            "model": f"candidates/{name}/{fold}/model.model", "curve": f"candidates/{twin}/{fold}/{LOG}",
            **({"trained_by": f"candidates/{twin}/{fold}"} if curve_of else {}), **extra}


def place_logs(out: Path, mace_log: Path, records: list[dict], scale: dict[str, float] | None = None) -> None:
    """Put a copy of the real log where each record's curve says (errors times ``scale[candidate]``)."""
    for r in (r for r in records if r["curve"]):
        path = out / r["curve"]
        path.parent.mkdir(parents=True, exist_ok=True)
        factor = (scale or {}).get(r["candidate"], 1.0)
        lines = [json.loads(line) for line in mace_log.read_text().splitlines()]
        scaled = [{key: value * factor if key.startswith(("mae", "rmse")) else value for key, value in line.items()}
                  for line in lines]
        path.write_text("".join(json.dumps(line) + "\n" for line in scaled))


def info(winner: str, **changes) -> dict:
    base = {"winner": winner, "best_model": "best.model", "retrained_on_all": False,
            "criterion": {"energy_weight": 1.0, "forces_weight": 1.0},
            "validation": {"mode": "fraction", "detail": "the last 25 % of train.xyz in file order", "n_train": 18,
                           "n_valid": 6, "folds": None, "order_key": None},
            "reproduce": {"command": "protoalign finetune -- --train_file train.xyz --lr 0.003",
                          "note": "On your files."},
            "skipped": ["align_1: alignment candidates need --prototypes"],
            "provenance": {"foundation_model_sha256": SHA, "versions": {"mace-torch": "0.3.16"}},
            "settings": {"valid_fraction": 0.25}}
    return {**base, **changes}


def strict_json(path: Path) -> dict:
    """JSON that must not hold NaN or Infinity (which are not JSON)."""
    def refuse(constant):
        raise AssertionError(f"{constant} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_report_answers_which_candidate_won_and_why(tmp_path, mace_log):
    records = [record("lr3e-3", 12.0, 30.0, best_epoch=1), record("lr3e-3_refit", 11.0, 30.0, curve_of="lr3e-3",
                                                                  setting="offset refit"),
               record("lr1e-3", 15.0, 29.0), record("diverged", math.nan, math.nan)]
    place_logs(tmp_path, mace_log, records, scale={"lr1e-3": 1.5})
    ranked = rank_candidates(records, 1.0, 1.0)
    paths = write_report(tmp_path, ranked, records, info("lr3e-3_refit"))
    assert set(paths) == {"report_md", "report_json", "curves"}
    md = paths["report_md"].read_text()
    head = md.split("## Candidates")[0]
    assert md.startswith("# protoalign tune: `lr3e-3_refit` is the best of 4 candidates")
    assert "**Use `best.model`**: candidate `lr3e-3_refit` (offset refit)" in head
    assert "energy MAE 11.0 meV per configuration (1.83 meV/atom), force MAE 30.0 meV/Å" in head
    assert f"= {(1.0 + 30 / 29) / 2:.3f}, with w_E = 1, w_F = 1" in head
    assert "E_best = 11.0 meV and F_best = 29.0 meV/Å" in head
    assert "10 % more energy error costs as much as 10 % more force error" in head
    assert "Next: `lr3e-3` at" in head and "energy +9 %, forces +0 %" in head
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| candidate", "| ---"))]
    assert [row.split(" | ")[0] for row in rows] == ["| **lr3e-3_refit** (chosen)", "| lr3e-3", "| lr1e-3",
                                                     "| diverged"]
    assert "– (not finite)" in rows[-1]
    assert "- align_1: alignment candidates need --prototypes" in md
    assert "```bash\nprotoalign finetune -- --train_file train.xyz --lr 0.003\n```" in md
    assert "The last 25 % of train.xyz in file order (18 training configurations, 6 validation configurations)." in md
    assert "contiguous" in md and SHA in md and "![validation curves](validation_curves.png)" in md

    data = strict_json(paths["report_json"])
    assert data["winner"] == "lr3e-3_refit" and [c["name"] for c in data["candidates"]] == [r.name for r in ranked]
    assert [c["score"] for c in data["candidates"][:3]] == pytest.approx([r.score for r in ranked[:3]])
    assert data["candidates"][-1]["score"] is None and data["candidates"][0]["valid_energy_sd_mev"] is None
    assert data["criterion"]["best_force_mae_mev_per_a"] == 29.0 and data["settings"] == {"valid_fraction": 0.25}
    assert {(t["candidate"], t["trained_by"]) for t in data["tasks"]} >= {("lr3e-3_refit", "candidates/lr3e-3/holdout")}
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*partial"))


def test_curves_are_read_from_the_real_log_one_line_per_training(tmp_path, mace_log):
    evals = read_eval_lines(mace_log)
    assert [line["epoch"] for line in evals] == [None, 0, 1]
    energy = epoch_values(evals, "mae_e")
    assert sorted(energy) == [0, 1, 2] and energy[2] == pytest.approx(1000 * evals[2]["mae_e"])
    records = [record("a", 10.0, 20.0, best_epoch=0), record("a_refit", 9.0, 20.0, curve_of="a", best_epoch=0),
               record("b", 12.0, 25.0, best_epoch=None), record("no_log", 13.0, 26.0, curve=None)]
    place_logs(tmp_path, mace_log, records, scale={"b": 2.0})
    curves, energy_label, force_label = training_curves(tmp_path, rank_candidates(records, 1, 1), records)
    assert (energy_label, force_label) == ("energy MAE (meV)", "force MAE (meV/Å)")
    assert [curve.names for curve in curves] == [("a_refit", "a"), ("b",)]  # ranked order; twins share a line
    assert curves[0].kept_epoch == 1 and curves[1].kept_epoch is None
    assert curves[1].energy == pytest.approx([2 * v for v in curves[0].energy])
    assert curves[0].force[1] == pytest.approx(1000 * evals[1]["mae_f"])
    figure = curves_figure(curves, "a_refit", energy_label, force_label)
    assert [axis.get_ylabel() for axis in figure.axes[:2]] == ["validation energy MAE (meV)",
                                                              "validation force MAE (meV/Å)"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["a_refit (chosen), a", "b"]


def test_fold_curves_are_averaged_over_the_epochs_every_fold_ran(tmp_path, mace_log):
    records = [record("a", 10.0 + i, 20.0, fold=f"fold{i}", best_epoch=i - 1) for i in (1, 2, 3)]
    place_logs(tmp_path, mace_log, records)
    short = tmp_path / records[2]["curve"]  # fold3 stopped one epoch earlier
    kept = [line for line in short.read_text().splitlines() if '"epoch": 1,' not in line]
    short.write_text("".join(line + "\n" for line in kept) + '{"loss": 1.5, "mae_e": 0.0')  # and a line cut short
    (curve,), _, _ = training_curves(tmp_path, rank_candidates(records, 1, 1), records)
    assert curve.epochs == (0, 1) and curve.kept_epoch == 2 and curve.n_folds == 3  # mean best epoch 1, + 1
    evals = read_eval_lines(mace_log)
    assert curve.energy == pytest.approx([1000 * evals[0]["mae_e"], 1000 * evals[1]["mae_e"]])


def test_a_retrain_on_all_and_no_logs_and_a_rerun(tmp_path):
    records = [record("a", 10.0 + i, 20.0, fold=f"fold{i}", curve=None) for i in (1, 2)]
    records += [record("b", 10.0 + i, 22.0, fold=f"fold{i}", curve=None) for i in (1, 2)]
    retrain = {**record("a", math.nan, math.nan, fold="all", curve=None, epochs_run=7), "n_train": 24}
    ranked = rank_candidates(records, 1.0, 1.0)
    paths = write_report(tmp_path, ranked, [*records, retrain], info("a", retrained_on_all=True))
    md = paths["report_md"].read_text()
    assert paths["curves"] is None and not (tmp_path / "validation_curves.png").exists()
    assert "No per-epoch logs were found." in md
    assert "retrained on all 24 configurations for 7 epochs" in md
    assert "energy MAE 11.5 ± 0.7 meV per configuration" in md and "(mean ± sd over 2 folds)" in md
    assert strict_json(paths["report_json"])["retrained_on_all"] is True
    write_report(tmp_path, ranked, records, info("b", criterion={"energy_weight": 2.0, "forces_weight": 1.0}))
    assert "`b` is the best" in paths["report_md"].read_text()  # a rerun replaces the report
    assert "20 % more force error" in paths["report_md"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_a_winner_outside_the_ranking_is_refused(tmp_path):
    records = [record("a", 10.0, 20.0, curve=None)]
    with pytest.raises(ProtoalignError, match="winner b is not among"):
        write_report(tmp_path, rank_candidates(records, 1, 1), records, info("b"))
    assert list(tmp_path.iterdir()) == []


def test_the_weights_in_words():
    assert weights_in_words(1, 1).endswith("10 % more energy error costs as much as 10 % more force error")
    assert weights_in_words(1, 4).endswith("as much as 2.5 % more force error")
    assert weights_in_words(1, 0) == "with w_F = 0 only the energy error counts"
