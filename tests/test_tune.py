"""protoalign tune: split math, candidate files and --max-epochs, the task plan, and real tiny tunes (choice,
resumption, best.model, SLURM, --folds with the final retrain)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import assert_one_line_error

from protoalign_cli.cli import main
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune.candidates import (active_candidates, cap_epochs, for_epochs, load_candidates, option_value,
                                            parse_candidates, retrain_epochs, with_option)
from protoalign_cli.tune.data import contiguous_block, contiguous_folds, order_by_key, validation_splits
from protoalign_cli.tune.plan import plan_tasks, training_groups, training_key
from protoalign_cli.tune.settings import differing_settings
from protoalign_cli.tune.task import epochs_run, kept_epoch


# ----------------------------------------------------------------------------- split math

def test_validation_block_is_the_last_ceil_fraction():
    assert contiguous_block(10, 0.2) == (list(range(8)), [8, 9])
    assert contiguous_block(30, 0.1) == (list(range(27)), [27, 28, 29])  # 0.1 x 30 is 3, not 4
    assert contiguous_block(11, 0.2) == (list(range(8)), [8, 9, 10])  # 2.2 rounds up
    assert contiguous_block(2, 0.01) == ([0], [1])
    with pytest.raises(ProtoalignError, match="leaves none to train on"):
        contiguous_block(4, 0.8)
    with pytest.raises(ProtoalignError, match="leaves none to train on"):
        contiguous_block(1, 0.2)


def test_folds_are_contiguous_blocks_covering_every_configuration_once():
    folds = contiguous_folds(10, 3)
    assert [valid for _, valid in folds] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for train, valid in folds:
        assert sorted(train + valid) == list(range(10)) and not set(train) & set(valid)
    assert contiguous_folds(2, 2) == [([1], [0]), ([0], [1])]
    with pytest.raises(ProtoalignError, match="--folds 3 needs at least 3 configurations.*--valid-fraction"):
        contiguous_folds(2, 3)
    with pytest.raises(ProtoalignError, match="--folds 1"):
        contiguous_folds(5, 1)


def test_blocks_follow_the_order_key_with_ties_in_file_order():
    order = order_by_key([3.0, 1.0, 2.0, 1.0, 0.5])
    assert order == [4, 1, 3, 2, 0]
    splits = validation_splits(5, "fraction", 0.4, None, order)
    assert splits == {"holdout": ([4, 1, 3], [2, 0])}  # the two latest by the key validate
    folds = validation_splits(5, "folds", None, 2, order)
    assert folds["fold1"] == ([2, 0], [4, 1, 3]) and folds["fold2"] == ([4, 1, 3], [2, 0])


# ----------------------------------------------------------------------------- recipes and --max-epochs

def test_max_epochs_caps_length_scales_stage_two_and_caps_patience():
    recipe = ["--lr", "0.003", "--max_num_epochs", "200", "--patience", "30", "--swa", "--start_swa", "150"]
    assert cap_epochs(recipe, 20, 2048, 2048) == ["--lr", "0.003", "--max_num_epochs", "20", "--patience", "20",
                                                  "--swa", "--start_swa", "15"]
    assert cap_epochs(recipe, 2, 2048, 2048)[-1] == "1"  # 150 x 2 / 200 rounds to 2: moved to the last epoch
    assert cap_epochs(["--start_stage_two=150", "--max_num_epochs=200"], 1, 2048, 2048) == [
        "--start_stage_two=1", "--max_num_epochs=1", "--patience", "1"]  # >= 1; the alias and = forms kept
    assert cap_epochs(recipe, 500, 2048, 2048) == recipe  # nothing to cap
    # later arguments win, as in mace's parser: the candidate's 100 epochs over the recipe's 200
    later = cap_epochs(["--max_num_epochs", "200", "--start_swa", "150", "--max_num_epochs", "100"], 50, 2048, 2048)
    assert option_value(later, ("--max_num_epochs",)) == "50" and option_value(later, ("--start_swa",)) == "75"
    # absent options take mace's defaults (2048 epochs, patience 2048)
    assert cap_epochs(["--lr", "0.01"], 5, 2048, 2048) == ["--lr", "0.01", "--max_num_epochs", "5", "--patience", "5"]
    with pytest.raises(ProtoalignError, match="--max_num_epochs must be an integer"):
        cap_epochs(["--max_num_epochs", "many"], 5, 2048, 2048)


def test_the_final_retrain_trains_the_mean_best_epoch_plus_one_without_early_stop():
    assert retrain_epochs([3, 4, 6]) == 5  # mean 4.33 -> 4, plus one
    assert retrain_epochs([None, 9]) == 10 and retrain_epochs([None, None]) is None
    assert for_epochs(["--max_num_epochs", "200", "--patience", "30"], 5) == ["--max_num_epochs", "5", "--patience", "5"]
    assert with_option(["--lr", "1"], ("--patience",), "7") == ["--lr", "1", "--patience", "7"]


# ----------------------------------------------------------------------------- candidates

def test_default_candidates_parse_with_refit_twins_and_alignment():
    candidates = load_candidates("default")
    names = [m.name for m in candidates.methods]
    assert names[:4] == ["lr5e-3", "lr3e-3", "lr5e-3_e100", "lr5e-3_s2"]
    assert [m.name for m in candidates.methods if m.refit_offset] == [f"{n}_refit" for n in names[:4]]
    assert [m.kind for m in candidates.methods][-3:] == ["align"] * 3
    assert candidates.mace_args[:4] == ("--E0s", "estimated", "--lr", "0.005")
    assert "--swa" in candidates.method("lr5e-3_s2").args
    result = CliRunner().invoke(main, ["tune", "--show-candidates"])
    assert result.exit_code == 0
    assert parse_candidates(yaml.safe_load(result.output), "shown").data == candidates.data


def test_candidate_files_are_checked_with_the_bench_syntax(tmp_path):
    listed = parse_candidates([{"name": "a", "method": "naive"}], "f.yaml")
    assert listed.mace_args == load_candidates("default").mace_args  # a plain list keeps the default recipe
    own = parse_candidates({"mace_args": ["--lr", "0.01"], "candidates": [{"method": "lora"}]}, "f.yaml")
    assert own.mace_args == ("--lr", "0.01") and own.methods[0].name == "lora"
    cases = {
        "candidates: [{method: naive, foo: 1}]": r"f.yaml: candidates\[0\]: unknown key.s. foo",
        "mace_arg: []\ncandidates: [{method: naive}]": "unknown key.s. mace_arg; known: mace_args, candidates",
        "candidates: [{method: naive}, {method: naive}]": "used twice: naive",
        "candidates: [{method: select, from: [a]}]": "trains nothing",
        "candidates: [{method: multihead}]": "replays source structures",
        "candidates: [{method: naive, seeds: [1]}]": "bench keys",
        "candidates: [{method: align, align_weight: 1, prototypes_args: [--k, '1']}]": "builds prototypes anew",
        "mace_args: [--seed, '3']\ncandidates: [{method: naive}]": "--seed is set by tune",
        "candidates: []": "non-empty list",
        "[unclosed": "not valid YAML",
    }
    for text, message in cases.items():
        (tmp_path / "f.yaml").write_text(text)
        with pytest.raises(ProtoalignError, match=message):
            load_candidates(str(tmp_path / "f.yaml"))


def test_alignment_candidates_need_prototypes_and_a_hopeful_diagnosis():
    candidates = parse_candidates([{"name": "plain", "method": "naive"},
                                   {"name": "al", "method": "align", "align_weight": 0.01}], "f.yaml")
    kept, skipped = active_candidates(candidates, False, None, False)
    assert [m.name for m in kept] == ["plain"] and skipped == ["al: an alignment candidate; skipped without --prototypes"]
    assert [m.name for m in active_candidates(candidates, True, None, False)[0]] == ["plain", "al"]
    kept, skipped = active_candidates(candidates, True, "...: expect no gain in energy error from alignment", False)
    assert [m.name for m in kept] == ["plain"] and "expect no gain" in skipped[0] and "--keep-alignment" in skipped[0]
    assert len(active_candidates(candidates, True, "expect no gain", True)[0]) == 2
    only_align = parse_candidates([{"name": "al", "method": "align", "align_weight": 0.01}], "f.yaml")
    with pytest.raises(ProtoalignError, match="no candidate left to train"):
        active_candidates(only_align, False, None, False)


def test_twins_share_one_training_task_per_fold():
    commands = {"a_refit": ("x",), "a": ("x",), "b": ("y",)}
    groups = training_groups(commands, {"a_refit": True, "a": False, "b": False})
    assert groups == [("a", "a_refit"), ("b",)]  # the one that does not refit trains, in its own folder
    tasks = plan_tasks(groups, ["fold1", "fold2"])
    assert [(t.index, t.trainer, t.fold) for t in tasks] == [(0, "a", "fold1"), (1, "a", "fold2"), (2, "b", "fold1"),
                                                             (3, "b", "fold2")]
    assert tasks[0].label == "a + a_refit, fold1"


def test_recipes_that_train_the_same_share_a_task_whatever_their_spelling():
    recipe = ["mace_run_train", "--name", "model", "--lr", "0.005", "--max_num_epochs", "100"]
    assert training_key(recipe) == training_key([*recipe[:5], "--max_num_epochs", "200", "--max_num_epochs=100"])
    assert training_key(recipe) != training_key([*recipe, "--lr", "0.003"])
    align = ["protoalign", "finetune", "--prototypes", "p.h5", "--align-weight", "0.01", "--", *recipe[1:]]
    assert training_key(align) != training_key([*align[:5], "1", *align[6:]])  # the program's own options count
    assert training_key(align) != training_key(recipe)


def test_only_training_settings_make_an_output_folder_another_tune():
    earlier = {"train": "/a/t.xyz", "sha256": {"train": "1"}, "max_epochs": None, "energy_weight": 1.0}
    moved = {**earlier, "train": "/b/t.xyz", "energy_weight": 3.0}
    assert differing_settings(moved, earlier) == []
    assert differing_settings({**moved, "sha256": {"train": "2"}, "max_epochs": 5}, earlier) == ["max_epochs", "sha256"]


def test_mace_log_parsing():
    assert kept_epoch("INFO: Loaded Stage one model from epoch 7 for evaluation\n") == 7
    assert kept_epoch("Loaded Stage one model from epoch 7 for evaluation\n"
                      "Loaded Stage two model from epoch 12 for evaluation\n") == 12
    assert kept_epoch("no such line") is None
    lines = [json.dumps({"mode": "eval", "epoch": None}), json.dumps({"mode": "opt", "epoch": 5}),
             json.dumps({"mode": "eval", "epoch": 0}), "", json.dumps({"mode": "eval", "epoch": 2})]
    assert epochs_run(lines) == 3 and epochs_run(lines[:2]) is None


# ----------------------------------------------------------------------------- real tiny tunes

THREE_CANDIDATES = """mace_args: [--E0s, estimated, --batch_size, '4', --max_num_epochs, '{epochs}', --default_dtype, float64]
candidates:
  - {{name: fast, method: naive, args: {{lr: 0.01}}}}
  - {{name: slow, method: naive, args: {{lr: 0.0001}}}}
  - {{name: fast_refit, method: naive, args: {{lr: 0.01}}, refit_offset: true}}
"""


def tune(*args) -> str:
    result = CliRunner().invoke(main, ["tune", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.output


def tune_args(tmp_path: Path, model: Path, train: Path, out: Path, epochs: int = 1, *extra) -> list:
    (tmp_path / "candidates.yaml").write_text(THREE_CANDIDATES.format(epochs=epochs))
    return ["--foundation-model", model, "--train", train, "--candidates", tmp_path / "candidates.yaml",
            "--out", out, *extra]


def criterion(records: list[dict]) -> dict[str, float]:
    """score = (E / E_best + F / F_best) / 2 per candidate, from its records (means over folds)."""
    means = {}
    for name in {r["candidate"] for r in records}:
        mine = [r for r in records if r["candidate"] == name]
        means[name] = (sum(r["valid_energy_mae_mev"] for r in mine) / len(mine),
                       sum(r["valid_force_mae_mev_per_a"] for r in mine) / len(mine))
    best_e, best_f = min(e for e, _ in means.values()), min(f for _, f in means.values())
    return {name: (e / best_e + f / best_f) / 2 for name, (e, f) in means.items()}


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in sorted(out.glob("candidates/**/*")) if p.is_file() and not p.name.endswith(".lock")}


def test_tune_picks_the_lowest_score_resumes_and_writes_a_usable_best_model(tmp_path, tiny_model, molecules_xyz):
    import ase.io
    import numpy as np

    from protoalign_cli.bench.evaluate import calculator

    out = tmp_path / "out"
    args = tune_args(tmp_path, tiny_model, molecules_xyz, out, 1, "--valid-fraction", "0.25", "--jobs", "2")
    output = tune(*args)
    assert "2 tasks (3 candidates on 1 fold(s)): 0 already done, 2 to run, 2 at a time" in output
    records = {name: json.loads((out / "candidates" / name / "holdout" / "done.json").read_text())
               for name in ("fast", "slow", "fast_refit")}
    scores = criterion(list(records.values()))
    assert len(set(scores.values())) == 3  # three different candidates: a real choice
    winner = min(scores, key=lambda name: (scores[name], name))
    report = json.loads((out / "report.json").read_text())
    assert report["winner"] == winner and f"chosen: {winner} (score {scores[winner]:.3f})" in output
    for row in report["candidates"]:
        assert row["score"] == pytest.approx(scores[row["name"]], rel=1e-12)
        assert row["valid_energy_mae_mev"] == records[row["name"]]["valid_energy_mae_mev"]
    assert [row["name"] for row in report["candidates"]] == sorted(scores, key=lambda n: (scores[n], n))

    # the time-separated split: the last quarter of the file validates, the rest trains
    frames = ase.io.read(molecules_xyz, ":")
    valid = ase.io.read(out / "splits" / "holdout" / "valid.xyz", ":")
    assert [a.positions.tobytes() for a in valid] == [a.positions.tobytes() for a in frames[18:]]
    assert records["fast"]["n_train"] == 18 and records["fast"]["n_valid"] == 6
    # the refit twin reuses its twin's training: one evaluation, forces unchanged, energies not
    assert records["fast_refit"]["trained_by"] == "candidates/fast/holdout"
    assert not (out / "candidates" / "fast_refit" / "holdout" / "train.log").exists()
    assert records["fast_refit"]["valid_force_mae_mev_per_a"] == pytest.approx(
        records["fast"]["valid_force_mae_mev_per_a"], rel=1e-9)
    assert records["fast_refit"]["valid_energy_mae_mev"] != pytest.approx(records["fast"]["valid_energy_mae_mev"])
    assert records["fast"]["best_epoch"] == 0 and records["fast"]["epochs_run"] == 1
    assert records["fast"]["curve"] == "candidates/fast/holdout/results/model_run-0_train.txt"

    # best.model is the winner's evaluated model, and it works in mace's calculator
    assert (out / "best.model").read_bytes() == (out / records[winner]["model"]).read_bytes()
    atoms = frames[0].copy()
    atoms.calc = calculator(out / "best.model", "cpu")
    assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()

    # a second identical call trains nothing and rewrites the report
    before, report_time = mtimes(out), (out / "report.md").stat().st_mtime_ns
    output = tune(*args)
    assert "2 already done, 0 to run" in output and ": running" not in output
    assert mtimes(out) == before and (out / "report.md").stat().st_mtime_ns > report_time
    # other weights choose again among the same trainings; other training settings are refused
    output = tune(*args, "--energy-weight", "0", "--forces-weight", "1")
    assert "2 already done, 0 to run" in output and mtimes(out) == before
    by_forces = min(records, key=lambda name: (records[name]["valid_force_mae_mev_per_a"], name))
    assert json.loads((out / "report.json").read_text())["winner"] == by_forces
    result = CliRunner().invoke(main, ["tune", *map(str, args), "--max-epochs", "5"])
    assert_one_line_error(result, "made with other settings (max_epochs differ); use another --out")


def test_slurm_writes_one_array_task_per_training_and_folds_cut_blocks(tmp_path, tiny_model, molecules_xyz):
    import ase.io

    out = tmp_path / "out"
    args = tune_args(tmp_path, tiny_model, molecules_xyz, out, 1, "--folds", "3")
    output = tune(*args, "--slurm", "--sbatch-option=--gres=gpu:1")
    script = (out / "tune.sbatch").read_text()
    assert "#SBATCH --array=0,1,2,3,4,5" in script and "#SBATCH --gres=gpu:1" in script  # 2 trainings x 3 folds
    assert f"tune --out {out} --task $SLURM_ARRAY_TASK_ID" in script and "wrote" in output
    assert not list(out.glob("candidates/*/*/done.json"))
    frames = [a.positions.tobytes() for a in ase.io.read(molecules_xyz, ":")]
    for k, block in enumerate((range(0, 8), range(8, 16), range(16, 24)), start=1):
        valid = [a.positions.tobytes() for a in ase.io.read(out / "splits" / f"fold{k}" / "valid.xyz", ":")]
        train = [a.positions.tobytes() for a in ase.io.read(out / "splits" / f"fold{k}" / "train.xyz", ":")]
        assert valid == [frames[i] for i in block] and sorted(train + valid) == sorted(frames)
    assert len(ase.io.read(out / "splits" / "all" / "train.xyz", ":")) == 24
    result = CliRunner().invoke(main, ["tune", "--out", str(out), "--task", "7"])
    assert assert_one_line_error(result) == "Error: --task 7 is outside 0..6"
    result = CliRunner().invoke(main, ["tune", "--out", str(out), "--task", "6"])  # the retrain needs the folds
    assert_one_line_error(result, "6 validation task(s) unfinished")


def test_a_batch_larger_than_a_training_set_is_refused_before_anything_is_written(tmp_path, tiny_model, molecules_xyz):
    # mace drops incomplete batches: the default recipe's 5 configurations per batch, and 2 to train on
    result = CliRunner().invoke(main, ["tune", "--foundation-model", str(tiny_model), "--train", str(molecules_xyz),
                                       "--valid-fraction", "0.9", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "candidate lr5e-3: --batch_size 5, but a fold trains on only 2 configuration(s)")
    assert not (tmp_path / "out").exists()


def test_an_unknown_mace_option_of_a_candidate_is_refused_before_anything_is_written(tmp_path, tiny_model,
                                                                                     molecules_xyz):
    (tmp_path / "typo.yaml").write_text("candidates: [{name: typo, method: naive, args: {lrr: 0.1}}]\n")
    result = CliRunner().invoke(main, ["tune", "--foundation-model", str(tiny_model), "--train", str(molecules_xyz),
                                       "--candidates", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "candidate typo: unknown mace_run_train option(s): --lrr 0.1")
    assert not (tmp_path / "out").exists()


def test_a_validation_file_or_an_order_key_defines_the_split(tmp_path, tiny_model, molecules_xyz):
    import ase.io

    frames = ase.io.read(molecules_xyz, ":")
    for position, atoms in enumerate(frames):
        atoms.info["time"] = (position * 7) % 24  # a shuffled file with integer time stamps (ase reads numpy ints)
    ase.io.write(tmp_path / "shuffled.xyz", frames[:20])
    ase.io.write(tmp_path / "valid.xyz", frames[20:])
    out = tmp_path / "file"
    tune(*tune_args(tmp_path, tiny_model, tmp_path / "shuffled.xyz", out, 1, "--valid", tmp_path / "valid.xyz",
                    "--slurm"))
    assert "#SBATCH --array=0,1\n" in (out / "tune.sbatch").read_text()
    assert len(ase.io.read(out / "splits" / "holdout" / "train.xyz", ":")) == 20
    assert len(ase.io.read(out / "splits" / "holdout" / "valid.xyz", ":")) == 4
    out = tmp_path / "ordered"
    tune(*tune_args(tmp_path, tiny_model, tmp_path / "shuffled.xyz", out, 1, "--order-key", "time",
                    "--valid-fraction", "0.2", "--slurm"))
    valid_times = [a.info["time"] for a in ase.io.read(out / "splits" / "holdout" / "valid.xyz", ":")]
    assert valid_times == sorted(a.info["time"] for a in frames[:20])[-4:]  # the latest four, in time order


def test_alignment_candidates_follow_the_prototypes_and_the_diagnosis(tmp_path, tiny_model, molecules_xyz,
                                                                        prototypes_file):
    (tmp_path / "mixed.yaml").write_text("""mace_args: [--batch_size, '4', --max_num_epochs, '1']
candidates:
  - {name: plain, method: naive}
  - {name: al, method: align, align_weight: 0.01}
""")
    common = ["tune", "--foundation-model", tiny_model, "--train", molecules_xyz, "--candidates",
              tmp_path / "mixed.yaml", "--slurm"]
    output = tune(*common[1:], "--out", tmp_path / "plain")
    assert "skipped al: an alignment candidate; skipped without --prototypes" in output
    assert "#SBATCH --array=0\n" in (tmp_path / "plain" / "tune.sbatch").read_text()

    output = tune(*common[1:], "--prototypes", prototypes_file, "--out", tmp_path / "aligned")
    verdict = json.loads((tmp_path / "aligned" / "diagnose" / "report.json").read_text())["results"]["verdict"]
    no_gain = any("expect no gain" in line for line in verdict)
    assert ("skipped al: skipped because protoalign diagnose" in output) == no_gain
    array = "0" if no_gain else "0,1"
    assert f"#SBATCH --array={array}\n" in (tmp_path / "aligned" / "tune.sbatch").read_text()
    output = tune(*common[1:], "--prototypes", prototypes_file, "--keep-alignment", "--out", tmp_path / "kept")
    assert "skipped" not in output and "#SBATCH --array=0,1\n" in (tmp_path / "kept" / "tune.sbatch").read_text()


@pytest.mark.slow
def test_folds_retrain_the_winner_on_every_configuration(tmp_path, tiny_model, molecules_xyz):
    import ase.io

    from protoalign_cli.bench.layout import read_done
    from protoalign_cli.bench.report import shown_path

    out = tmp_path / "out"
    output = tune(*tune_args(tmp_path, tiny_model, molecules_xyz, out, 2, "--folds", "3", "--jobs", "2"))
    assert "6 tasks (3 candidates on 3 fold(s)): 0 already done, 6 to run" in output
    records = [read_done(p) for p in sorted(out.glob("candidates/*/fold*/done.json"))]
    assert len(records) == 9
    scores = criterion(records)
    winner = min(scores, key=lambda name: (scores[name], name))
    final = read_done(out / "candidates" / winner / "all" / "done.json")
    assert final["n_train"] == 24 and final["n_valid"] is None and final["valid_energy_mae_mev"] is None
    assert len(ase.io.read(out / "splits" / "all" / "train.xyz", ":")) == 24
    best = [r["best_epoch"] for r in records if r["candidate"] == winner]
    assert final["retrain_epochs"] == round(sum(best) / 3) + 1 == final["epochs_run"]
    assert (out / "best.model").read_bytes() == (out / final["model"]).read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["winner"] == winner and report["retrained_on_all"] is True
    train = shown_path(molecules_xyz)  # the user's own file, all of it, as mace's training and validation file
    assert f"--train_file {train} --valid_file {train}" in report["reproduce"]["command"]
    assert f"--max_num_epochs {final['retrain_epochs']}" in report["reproduce"]["command"]
    output = tune(*tune_args(tmp_path, tiny_model, molecules_xyz, out, 2, "--folds", "3", "--jobs", "2"))
    assert "6 already done, 0 to run" in output and "already done" in output.split("final retrain")[1]
    assert ": running" not in output
