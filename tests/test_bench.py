"""protoalign bench: config checks, metrics, selection on validation, summaries, and a real tiny grid."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error

from protoalign_cli.bench.config import load_config
from protoalign_cli.bench.data import prepare_splits, training_order
from protoalign_cli.bench.evaluate import shifted_metrics
from protoalign_cli.bench.layout import (BenchLayout, Run, claimed, lock_holder, plan_runs, reuse_finished,
                                         run_fingerprint, training_command)
from protoalign_cli.bench.methods import parse_method
from protoalign_cli.bench.report import CSV_COLUMNS, collect_rows, summary_markdown
from protoalign_cli.bench.schedule import chunk_of_grid
from protoalign_cli.bench.source import prepare_source, source_products
from protoalign_cli.bench.stats import (
    error_metrics,
    mean_sd,
    paired_percent_differences,
    select_by_validation,
    valid_shifted_energy_mae,
)
from protoalign_cli.cli import main
from protoalign_cli.errors import ProtoalignError

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, model: Path, target: Path, methods: str, extra: str = "", epochs: int = 1) -> Path:
    """A bench YAML over the tiny model and molecules (pool 0-11, valid 12-15, test 16-23)."""
    path = folder / "bench.yaml"
    path.write_text(f"""
name: tiny
foundation_model: {model}
source:
  structures: [{target}]
  prototypes_args: [--k, '2']
target: {{files: {target}}}
split: {{pool: [0, 12], valid: [12, 16], test: [16, 24]}}
budgets: [6]
seeds: [0, 1]
mace_args: {{E0s: estimated, lr: 0.01, batch_size: 2, max_num_epochs: {epochs}, default_dtype: float64}}
methods:
{methods}
{extra}
""")
    return path


NAIVE_ALIGN = """  - {method: naive}
  - {name: align-1e-2, method: align, align_weight: 0.01}
  - {name: best, method: select, from: [align-1e-2]}"""


# ----------------------------------------------------------------------------- pure functions

def test_error_metrics_in_mev_per_atom_and_per_angstrom():
    pred_e, ref_e, n_atoms = np.array([1.0, 2.0]), np.array([1.003, 1.996]), np.array([3, 2])
    pred_f = np.zeros((5, 3))
    ref_f = np.zeros((5, 3))
    ref_f[0, 0], ref_f[4, 2] = 0.03, -0.06
    metrics = error_metrics(pred_e, ref_e, n_atoms, pred_f, ref_f)
    assert metrics["energy_mae_mev"] == pytest.approx(3.5)
    assert metrics["energy_rmse_mev"] == pytest.approx(math.sqrt((9 + 16) / 2))
    assert metrics["energy_mae_mev_per_atom"] == pytest.approx((1.0 + 2.0) / 2)
    assert metrics["force_mae_mev_per_a"] == pytest.approx(90.0 / 15)
    assert metrics["force_rmse_mev_per_a"] == pytest.approx(math.sqrt((900 + 3600) / 15))


def test_training_sets_are_seeded_and_nested_over_budgets():
    order = training_order(400, seed=3)
    assert sorted(order) == list(range(400))
    np.testing.assert_array_equal(order, training_order(400, seed=3))
    assert not np.array_equal(order[:25], training_order(400, seed=4)[:25])
    assert set(order[:25]) <= set(order[:50])


def test_valid_shifted_energy_mae_removes_only_the_validation_offset():
    test_error, valid_error = np.array([210.0, 190.0, 230.0]), np.array([195.0, 205.0])
    assert valid_shifted_energy_mae(test_error, valid_error) == pytest.approx((10 + 10 + 30) / 3)
    assert valid_shifted_energy_mae(test_error, np.zeros(2)) == pytest.approx(np.abs(test_error).mean())


def test_mean_sd_and_paired_differences():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([5.0])[0] == 5.0 and math.isnan(mean_sd([5.0])[1])
    assert all(math.isnan(v) for v in mean_sd([]))
    diffs = paired_percent_differences({0: 8.0, 1: 15.0, 2: 1.0}, {0: 10.0, 1: 10.0})
    assert diffs == pytest.approx([-20.0, 50.0])


def row(method, n, seed, valid, test):
    return {"method": method, "n_train": n, "seed": seed, "valid_energy_mae_mev": valid, "energy_mae_mev": test, "setting": ""}


def test_select_uses_validation_never_test():
    rows = [row("a", 10, 0, 5.0, 100.0), row("b", 10, 0, 6.0, 1.0),   # a wins on validation, b on test
            row("a", 10, 1, 9.0, 1.0), row("b", 10, 1, 2.0, 100.0),
            row("naive", 10, 0, 0.1, 0.1)]
    picked = select_by_validation(rows, ["a", "b"], "run")
    assert [(r["seed"], r["chosen"]) for r in picked] == [(0, "a"), (1, "b")]
    per_budget = select_by_validation(rows, ["a", "b"], "budget")  # means: a 7.0, b 4.0
    assert {r["chosen"] for r in per_budget} == {"b"} and len(per_budget) == 2


def test_a_run_is_claimed_by_one_live_process_at_a_time(tmp_path):
    import json
    import os
    import platform
    import subprocess
    import sys

    lock = tmp_path / "runs" / "naive" / "N6_seed0.lock"
    with claimed(lock, "naive N=6 seed=0"):
        assert lock_holder(lock) == f"pid {os.getpid()} on {platform.node()}"
        with pytest.raises(ProtoalignError, match="is being run by pid"):
            with claimed(lock, "naive N=6 seed=0"):
                pass
    assert not lock.exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(finished.stdout), "host": platform.node()}))  # a dead process
    assert lock_holder(lock) is None
    with claimed(lock, "naive N=6 seed=0"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- configuration

def test_config_errors_are_one_line(tmp_path, tiny_model, molecules_xyz):
    cases = {
        "  - {method: teleport}": "unknown method",
        "  - {method: naive}\n  - {method: naive}": "used twice",
        "  - {method: naive, args: [--seed, '3']}": "set by the harness",
        "  - {method: align}": "numeric align_weight",
        "  - {method: select, from: [nothing]}": "not a trained method",
        "  - {method: naive, align_weight: 0.1}": r"methods\[0\]: unknown key.s. align_weight",
        "  - {method: freeze}": r"methods\[0\] \(freeze\): freeze needs an integer",
    }
    for methods, message in cases.items():
        with pytest.raises(ProtoalignError, match=message):
            load_config(write_config(tmp_path, tiny_model, molecules_xyz, methods))
    overlapping = write_config(tmp_path, tiny_model, molecules_xyz, "  - {method: naive}").read_text()
    (tmp_path / "bench.yaml").write_text(overlapping.replace("valid: [12, 16]", "valid: [10, 16]"))
    with pytest.raises(ProtoalignError, match="overlap"):
        load_config(tmp_path / "bench.yaml")
    (tmp_path / "bench.yaml").write_text(overlapping + "\nreuse_run_from: elsewhere\n")
    with pytest.raises(ProtoalignError, match="unknown key.s. reuse_run_from"):
        load_config(tmp_path / "bench.yaml")
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "missing.yaml")])
    assert assert_one_line_error(result) == f"Error: bench config {tmp_path / 'missing.yaml'} does not exist"


def test_training_commands_per_method(tmp_path, tiny_model, molecules_xyz):
    methods = """  - {method: naive}
  - {name: al, method: align, align_weight: 0.001, align_args: [--align-weighting, hard]}
  - {method: multihead, args: {num_samples_pt: 8}}
  - {method: lora, args: [--lora_rank, '2']}
  - {method: freeze, freeze: 1}
  - {method: scratch, args: [--hidden_irreps, 8x0e]}"""
    config = load_config(write_config(tmp_path, tiny_model, molecules_xyz, methods))
    layout = BenchLayout(tmp_path / "out")
    runs = plan_runs(config)
    assert len(runs) == 12 and [r.index for r in runs] == list(range(12))
    products = source_products(config, layout)
    commands = {r.method: training_command(config, layout, r, products) for r in runs if r.seed == 1}
    for name, argv in commands.items():
        text = " ".join(argv)
        assert f"--train_file {layout.train_file(6, 1)} --valid_file {layout.valid_file}" in text
        assert "--seed 1" in text and "--max_num_epochs 1" in text and "--test_file" not in text
        assert ("--foundation_model" in text) == (name != "scratch")
    assert Path(commands["al"][0]).name == "protoalign"
    assert commands["al"][1:7] == ["finetune", "--prototypes", str(products["prototypes"]), "--align-weight", "0.001",
                                   "--align-weighting"]
    assert "--multiheads_finetuning True --pt_train_file" in " ".join(commands["multihead"])
    assert "--force_mh_ft_lr True" in " ".join(commands["multihead"])
    assert "--num_samples_pt 8" in " ".join(commands["multihead"])
    assert "--multiheads_finetuning False --lora True" in " ".join(commands["lora"])
    assert "--multiheads_finetuning False --freeze 1" in " ".join(commands["freeze"])
    assert "--multiheads_finetuning False" in " ".join(commands["naive"])


def test_align_methods_with_own_prototype_settings_get_their_own_file(tmp_path, tiny_model, molecules_xyz):
    from protoalign_cli.io.schema import read_prototypes

    methods = """  - {name: default, method: align, align_weight: 0.01}
  - {name: k1, method: align, align_weight: 0.01, prototypes_args: [--k, '1', --features, energy]}
  - {name: k1-again, method: align, align_weight: 0.1, prototypes_args: [--k, '1', --features, energy]}"""
    config = load_config(write_config(tmp_path, tiny_model, molecules_xyz, methods))
    layout = BenchLayout(tmp_path / "out")
    products = prepare_source(config, layout, say=lambda message: None)
    assert sorted(products) == ["prototypes", config.method("k1").prototypes_key]
    own = read_prototypes(products[config.method("k1").prototypes_key])
    shared = read_prototypes(products["prototypes"])
    assert own.n_prototypes == len(own.elements) and own.features == "energy"
    assert shared.n_prototypes == 2 * len(shared.elements) and shared.features == "all"
    runs = {r.method: r for r in plan_runs(config) if r.seed == 0}
    argv = {name: training_command(config, layout, run, products) for name, run in runs.items()}
    assert argv["k1"][argv["k1"].index("--prototypes") + 1] == argv["k1-again"][argv["k1-again"].index("--prototypes") + 1]
    assert argv["k1"][argv["k1"].index("--prototypes") + 1] != argv["default"][argv["default"].index("--prototypes") + 1]
    assert "--k 1 --features energy" in config.method("k1").setting
    prebuilt = write_config(tmp_path, tiny_model, molecules_xyz, methods).read_text().replace(
        f"structures: [{molecules_xyz}]", f"prototypes: {products['prototypes']}")
    (tmp_path / "bench.yaml").write_text(prebuilt)
    with pytest.raises(ProtoalignError, match="k1, k1-again set prototypes_args, which needs source.structures"):
        load_config(tmp_path / "bench.yaml")


def test_source_frames_restrict_the_source_structures(tmp_path, tiny_model, molecules_xyz):
    import ase.io

    text = write_config(tmp_path, tiny_model, molecules_xyz, NAIVE_ALIGN).read_text()
    text = text.replace("prototypes_args: [--k, '2']", "prototypes_args: [--k, '1']")  # 4 frames hold one N atom
    (tmp_path / "bench.yaml").write_text(text.replace("  prototypes_args:", "  frames: [2, 10]\n  configs_per_file: 4\n  prototypes_args:"))
    config = load_config(tmp_path / "bench.yaml")
    layout = BenchLayout(tmp_path / "out")
    prepare_source(config, layout, say=lambda message: None)
    chosen = ase.io.read(layout.source_dir / "structures.xyz", ":")
    frames = ase.io.read(molecules_xyz, ":")
    expected = [frames[i] for i in (2, 4, 7, 9)]  # 4 evenly spaced of frames 2..9
    assert [a.positions.tolist() for a in chosen] == [a.positions.tolist() for a in expected]
    (tmp_path / "bench.yaml").write_text(text.replace("  prototypes_args:", "  frames: [5, 2]\n  prototypes_args:"))
    with pytest.raises(ProtoalignError, match=r"source.frames must be \[start, stop\)"):
        load_config(tmp_path / "bench.yaml")
    (tmp_path / "bench.yaml").write_text(text.replace("  prototypes_args:", "  frames: [0, 999]\n  prototypes_args:"))
    with pytest.raises(ProtoalignError, match="source.frames needs 999"):
        prepare_source(load_config(tmp_path / "bench.yaml"), BenchLayout(tmp_path / "out2"), say=print)
    assert not (tmp_path / "out2" / "source" / "structures.xyz").exists()


def test_summary_reports_paired_differences_and_selection(tmp_path, tiny_model, molecules_xyz):
    config = load_config(write_config(tmp_path, tiny_model, molecules_xyz, NAIVE_ALIGN))
    rows = [{**row("naive", 6, s, 10.0, e), "energy_mae_mev_per_atom": e / 5, "force_mae_mev_per_a": 40.0,
             "wall_time_s": 3.0, "device": "cpu"} for s, e in ((0, 20.0), (1, 10.0))]
    rows += [{**row("align-1e-2", 6, s, 9.0, e), "energy_mae_mev_per_atom": e / 5, "force_mae_mev_per_a": f,
              "wall_time_s": 4.0, "device": "cpu"} for s, e, f in ((0, 15.0, 40.0), (1, 9.0, 44.0))]
    rows += [{**r, "method": "best"} for r in select_by_validation(rows, ["align-1e-2"], "run")]
    text = summary_markdown(config, rows)
    # ΔE per seed: -25 %, -10 %  -> -17.5 ± 10.6; ΔF: 0 %, +10 % -> +5.0 ± 7.1
    assert "| align-1e-2 | λ=0.01 | 6 | 2 | 12.0 ± 4.2 | 2.40 ± 0.85 | 42.0 ± 2.8 | -17.5 ± 10.6 | +5.0 ± 7.1 |" in text
    assert "| naive | – | 6 | 2 | 15.0 ± 7.1 |" in text
    assert "- N=6 seed=1: align-1e-2 (validation energy MAE 9.00 meV)" in text


def drawn_tick_labels(figure) -> list[tuple[float, str, float]]:
    """(tick value, label text, axis span) of every labelled tick inside the view of every axis, after an Agg draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    labels = []
    for ax in figure.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = sorted(limits)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text():
                    labels.append((tick.get_loc(), tick.label1.get_text(), high - low))
    return labels


@pytest.mark.parametrize("spread", [0.001, 0.01, 0.3, 2000.0])
def test_learning_curve_ticks_read_true_values(spread):
    """Close values on a log axis once got offset-less labels ("0.070" for 756.670 meV): every drawn
    label must read its tick's value, for close and for wide ranges alike."""
    from protoalign_cli.bench.report import CURVE_COLUMNS, learning_curve_figure

    rows = [{"method": method, "n_train": n, "seed": seed,
             **{column: 756.67 + spread * step / 4 + shift for column in CURVE_COLUMNS}}
            for step, n in enumerate((10, 20, 50, 100)) for seed in (0, 1)
            for method, shift in (("naive", 0.0), ("align", spread / 10))]
    figure = learning_curve_figure(rows, ["naive", "align"])
    labels = drawn_tick_labels(figure)
    assert labels
    for value, text, span in labels:
        assert float(text.replace("\N{MINUS SIGN}", "-")) == pytest.approx(value, abs=span / 100), (value, text)
    for axis in figure.axes:  # the N axis is labelled with the budgets, and only with them
        assert [label.get_text() for label in axis.get_xticklabels() if label.get_text()] == ["10", "20", "50", "100"]


def test_summary_paths_are_relative_to_where_the_bench_ran(tmp_path, tiny_model, molecules_xyz, monkeypatch):
    """A config's paths are resolved against its own folder; the summary shows them relative to the
    working directory (as typed there), never as the machine's absolute paths."""
    import shutil

    from protoalign_cli.bench.report import shown_path

    (tmp_path / "shared").mkdir()
    (tmp_path / "configs").mkdir()
    shutil.copy(tiny_model, tmp_path / "shared" / "tiny.model")
    shutil.copy(molecules_xyz, tmp_path / "shared" / "molecules.xyz")
    write_config(tmp_path / "configs", Path("../shared/tiny.model"), Path("../shared/molecules.xyz"), NAIVE_ALIGN)
    monkeypatch.chdir(tmp_path)
    text = summary_markdown(load_config(Path("configs/bench.yaml")), [])
    assert "Foundation model `shared/tiny.model`; target `shared/molecules.xyz`;" in text
    assert str(tmp_path) not in text
    assert shown_path(Path("/elsewhere/m.model"), tmp_path) == "/elsewhere/m.model"
    assert shown_path(tmp_path.parent / "sibling" / "m.model", tmp_path) == "../sibling/m.model"


def test_select_by_offset_free_validation_error():
    rows = [{**row("a", 10, 0, 5.0, 1.0), "valid_energy_mae_shifted_mev": 3.0},   # a: best raw, worse without offset
            {**row("b", 10, 0, 6.0, 1.0), "valid_energy_mae_shifted_mev": 2.0}]
    assert select_by_validation(rows, ["a", "b"], "run")[0]["chosen"] == "a"
    assert select_by_validation(rows, ["a", "b"], "run", "valid_energy_mae_shifted_mev")[0]["chosen"] == "b"
    spec = parse_method({"method": "select", "from": ["a", "b"], "by": "valid_energy_mae_shifted_mev"}, 0)
    assert spec.select_by == "valid_energy_mae_shifted_mev" and "without its mean" in spec.setting
    with pytest.raises(ProtoalignError, match="by must be one of valid_energy_mae_mev, valid_energy_mae_shifted_mev"):
        parse_method({"method": "select", "from": ["a"], "by": "energy_mae_mev"}, 0)  # the test set: refused
    assert shifted_metrics(
        {"energy_mean_error_mev": 0.0, "energy_errors_mev": [1.0, 3.0]},
        {"energy_errors_mev": [10.0, 14.0]})["valid_energy_mae_shifted_mev"] == pytest.approx(2.0)


def test_select_keeps_to_its_own_budgets_and_seeds(tmp_path, tiny_model, molecules_xyz):
    methods = """  - {method: naive}
  - {name: a, method: align, align_weight: 0.01}
  - {name: b, method: align, align_weight: 1.0, seeds: [0]}
  - {name: best, method: select, from: [a, b], seeds: [0]}"""
    config = load_config(write_config(tmp_path, tiny_model, molecules_xyz, methods))
    layout = BenchLayout(tmp_path / "out")
    for run in plan_runs(config):
        layout.run_dir(run).mkdir(parents=True)
        valid = {"a": 5.0, "b": 4.0}.get(run.method, 6.0)
        (layout.run_dir(run) / "done.json").write_text(json.dumps(row(run.method, run.n_train, run.seed, valid, 1.0)))
    chosen = [(r["seed"], r["setting"]) for r in collect_rows(config, layout) if r["method"] == "best"]
    assert [(seed, setting.split(":")[0]) for seed, setting in chosen] == [(0, "b")]  # not seed 1, where only a ran


def test_fingerprint_follows_file_contents_not_folders(tmp_path, tiny_model, molecules_xyz):
    config = load_config(write_config(tmp_path, tiny_model, molecules_xyz, "  - {method: naive}"))
    runs = plan_runs(config)
    layouts = [BenchLayout(tmp_path / name) for name in ("one", "two")]
    for layout in layouts:
        prepare_splits(config, layout, runs)
    prints = [[run_fingerprint(config, layout, run, {}) for run in runs] for layout in layouts]
    assert prints[0] == prints[1] and prints[0][0] != prints[0][1]
    train = layouts[1].train_file(6, 0)
    train.write_text(train.read_text().replace("REF_energy=-", "REF_energy=-1"))
    assert run_fingerprint(config, layouts[1], runs[0], {}) != prints[0][0]


def test_identical_training_of_another_bench_is_reused_under_any_entry_name(tmp_path, tiny_model, molecules_xyz):
    other = BenchLayout(tmp_path / "other")
    config = load_config(write_config(tmp_path, tiny_model, molecules_xyz, "  - {name: plain, method: naive}",
                                      extra=f"reuse_runs_from: [{other.out}]"))
    layout = BenchLayout(tmp_path / "out")
    runs = plan_runs(config)
    prepare_splits(config, layout, runs)
    prints = [run_fingerprint(config, layout, run, {}) for run in runs]
    for run, fingerprint in zip(runs, prints):  # seed 0 finished there as 'recipe-x', seed 1 with other settings
        folder = other.out / "runs" / "recipe-x" / run.key
        folder.mkdir(parents=True)
        done = {"method": "recipe-x", "fingerprint": fingerprint if run.seed == 0 else "other", "energy_mae_mev": 1.0}
        (folder / "done.json").write_text(json.dumps(done))
    reused = [reuse_finished(config, layout, run, fingerprint) for run, fingerprint in zip(runs, prints)]
    assert reused[1] is None
    assert reused[0]["method"] == "plain" and reused[0]["reused_run"] == "recipe-x/N6_seed0"
    assert json.loads((layout.run_dir(runs[0]) / "done.json").read_text()) == reused[0]


def test_summarize_writes_the_summaries_of_committed_runs_and_trains_nothing(tmp_path, tiny_model, molecules_xyz):
    committed = BenchLayout(tmp_path / "committed")
    path = write_config(tmp_path, tiny_model, molecules_xyz, "  - {method: naive}",
                        extra=f"reuse_runs_from: [{committed.out}]")
    config, scratch = load_config(path), BenchLayout(tmp_path / "scratch")
    runs = plan_runs(config)
    prepare_splits(config, scratch, runs)
    done = {**row("naive", 6, 0, 5.0, 7.0), "fingerprint": run_fingerprint(config, scratch, runs[0], {}),
            "force_mae_mev_per_a": 30.0, "wall_time_s": 12.0}
    (committed.run_dir(runs[0])).mkdir(parents=True)
    (committed.run_dir(runs[0]) / "done.json").write_text(json.dumps(done))
    out = tmp_path / "fresh"
    output = run_bench(path, "--out", out, "--summarize")
    assert "2 runs: 1 done, 1 not finished (not trained: summaries only)" in output
    assert not list(out.glob("runs/*/*/train.log")) and not list(out.glob("logs/*.log"))
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["seed"], float(r["energy_mae_mev"])) for r in rows] == [("naive", "0", 7.0)]
    assert (out / "summary.md").is_file()


# fingerprints of the bench before it became a package (protoalign_cli/bench.py at 884e3e5): finished
# runs of existing bench folders must keep being recognised, resumed and reused
FINGERPRINTS = {
    "naive": "d97b44f1d4fc63b157e34b19c783b6ecd09ee8ac6cc0ac45594c1fd26767c181",
    "al": "af8f9214ce62849d42aeb43aade039b60b3248fe0904d40c9417de8010ce8dfc",
    "own": "86aa30836d8d10b6a69ba6ecc13539c9c392a2d2b9b2e074613c6ecd467d52f3",
    "multihead": "4007866da3cc1a42f04ef31fad1705f7ca678357e4f5b06d277341113f4e435f",
    "lora": "42a4d67cacabab7f602df99f51166551a7e68fd30e66026480727f55e99fcc74",
    "freeze": "d2286ea7962b47acf1a668124b994329c270cb594fab3275e2c5bc474a9c3e7a",
    "scratch": "6d3605ce4c04c28846202227dbaadada2bff09161b59b545c120e366152a8ec4",
}


def test_fingerprints_of_every_method_kind_are_unchanged(tmp_path):
    # files enter by content and commands with placeholders, so fixed text files give fixed fingerprints
    for name in ("foundation.model", "target.xyz", "source.xyz", "prebuilt.h5"):
        (tmp_path / name).write_text(f"{name}\n")
    path = tmp_path / "bench.yaml"
    path.write_text("""
foundation_model: foundation.model
source: {structures: [source.xyz], prototypes: prebuilt.h5}
target: {files: target.xyz}
split: {pool: [0, 4], valid: [4, 6], test: [6, 8]}
budgets: [2]
seeds: [0]
mace_args: {E0s: average, lr: 0.01, max_num_epochs: 2}
methods:
  - {method: naive}
  - {name: al, method: align, align_weight: 0.01, align_args: [--align-weighting, hard]}
  - {name: own, method: align, align_weight: 1.0, prototypes_args: [--k, '1']}
  - {method: multihead, args: {num_samples_pt: 8}}
  - {method: lora, args: [--lora_rank, '2']}
  - {method: freeze, freeze: 1}
  - {method: scratch, args: [--hidden_irreps, 8x0e]}
""")
    config, layout = load_config(path), BenchLayout(tmp_path / "out")
    products = source_products(config, layout)
    assert sorted(products) == ["prototypes", "prototypes-eed582a9f801", "pseudolabels"]
    for file in (layout.train_file(2, 0), layout.valid_file, layout.test_file, *products.values()):
        file.parent.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            file.write_text(f"{file.name}\n")
    assert {run.method: run_fingerprint(config, layout, run, products) for run in plan_runs(config)} == FINGERPRINTS


def test_bench_configs_in_repository_parse(shared_dir):
    configs = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(path, check_files=False)  # prototypes may be another bench's output
        assert plan_runs(config)
        for file in (config.foundation_model, *config.target_files, *config.source_structures):
            # setting 2's foundation model is pretrained by benchmarks/pretrain_xtb_foundation.py into bench_runs/
            assert file.is_file() or "bench_runs" in file.parts, (path.name, file)


# ----------------------------------------------------------------------------- a real grid

def finetune_available() -> bool:
    return "finetune" in main.commands and "prototypes" in main.commands


def run_bench(*args) -> str:
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def done_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/*/done.json"))}


@pytest.mark.skipif(not finetune_available(), reason="protoalign finetune not installed yet")
def test_tiny_grid_outputs_and_resumption(tmp_path, tiny_model, molecules_xyz):
    import ase.io

    config = write_config(tmp_path, tiny_model, molecules_xyz, NAIVE_ALIGN)
    out = tmp_path / "out"
    output = run_bench(config, "--out", out, "--jobs", "2")
    assert "4 runs: 0 already done, 4 to run, 2 at a time" in output
    assert output.count(": done in ") == 4

    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["seed"]) for r in rows] == [("naive", "0"), ("naive", "1"), ("align-1e-2", "0"),
                                                        ("align-1e-2", "1"), ("best", "0"), ("best", "1")]
    for r in rows:
        assert r["n_train"] == "6" and r["device"].startswith("cpu")
        for column in CSV_COLUMNS[4:13]:
            assert 0 < float(r[column]) < 1e6, column
    naive = {r["seed"]: float(r["energy_mae_mev"]) for r in rows if r["method"] == "naive"}
    align = {r["seed"]: float(r["energy_mae_mev"]) for r in rows if r["method"] == "align-1e-2"}
    assert naive != align  # the alignment term changed the training
    diffs = [100 * (align[s] - naive[s]) / naive[s] for s in ("0", "1")]
    summary = (out / "summary.md").read_text()
    assert f"| {np.mean(diffs):+.1f} ± {np.std(diffs, ddof=1):.1f} |" in summary
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every method trained on the same files; the split is time-separated as configured
    frames = ase.io.read(molecules_xyz, ":")
    train = ase.io.read(out / "splits" / "N6_seed1" / "train.xyz", ":")
    pool_positions = [f.positions.tobytes() for f in frames[:12]]
    assert len(train) == 6 and all(t.positions.tobytes() in pool_positions for t in train)
    test = ase.io.read(out / "splits" / "test.xyz", ":")
    assert [t.positions.tobytes() for t in test] == [f.positions.tobytes() for f in frames[16:24]]
    for method in ("naive", "align-1e-2"):
        log = (out / "runs" / method / "N6_seed1" / "train.log").read_text()
        assert f"--train_file {out / 'splits' / 'N6_seed1' / 'train.xyz'}" in log

    for r in rows:
        assert 0 < float(r["energy_mae_valid_shifted_mev"]) < 1e6 and r["energy_mean_error_mev"]
    assert "| E MAE shifted (meV) | ΔE shifted (%) |" in summary
    assert "| valid F MAE (meV/Å) | train time (s) |" in summary  # the recipe is chosen on energies and forces

    before = done_times(out)
    output = run_bench(config, "--out", out, "--jobs", "2")
    assert "4 runs: 4 already done, 0 to run" in output and ": running" not in output
    assert done_times(out) == before

    # a run finished before the shifted metric existed is evaluated again, not trained again
    old_done = out / "runs" / "naive" / "N6_seed1" / "done.json"
    record = json.loads(old_done.read_text())
    shifted = record.pop("energy_mae_valid_shifted_mev")
    valid_shifted = record.pop("valid_energy_mae_shifted_mev")
    old_done.write_text(json.dumps(record))
    output = run_bench(config, "--out", out)
    assert "naive N=6 seed=1: evaluating again" in output and ": running" not in output
    assert json.loads(old_done.read_text())["energy_mae_valid_shifted_mev"] == pytest.approx(shifted, rel=1e-9)
    assert json.loads(old_done.read_text())["valid_energy_mae_shifted_mev"] == pytest.approx(valid_shifted, rel=1e-9)
    before = done_times(out)

    (out / "runs" / "align-1e-2" / "N6_seed0" / "done.json").unlink()
    output = run_bench(config, "--out", out, "--seed", "1")  # a chunk without the missing run trains nothing
    assert "4 runs (2 chosen by --only/--budget/--seed): 2 already done, 0 to run" in output
    assert ": running" not in output
    output = run_bench(config, "--out", out)
    assert "4 runs: 3 already done, 1 to run" in output
    assert [line for line in output.splitlines() if ": running" in line] == ["[3/4] align-1e-2 N=6 seed=0: running"]
    after = done_times(out)
    assert {k: v for k, v in after.items() if before[k] == v}.keys() == set(before) - {"runs/align-1e-2/N6_seed0/done.json"}
    with open(out / "runs.csv") as handle:
        rerun = {(r["method"], r["seed"]): float(r["energy_mae_mev"]) for r in csv.DictReader(handle)}
    assert rerun[("align-1e-2", "0")] == pytest.approx(align["0"], rel=1e-6)  # same seed, same result


def test_slurm_script_and_changed_settings_are_refused(tmp_path, tiny_model, molecules_xyz):
    config = write_config(tmp_path, tiny_model, molecules_xyz, "  - {method: naive}")
    out = tmp_path / "out"
    output = run_bench(config, "--out", out, "--slurm", "--sbatch-option=--gres=gpu:1")
    script = (out / "bench.sbatch").read_text()
    assert "#SBATCH --array=0,1" in script and "--run-index $SLURM_ARRAY_TASK_ID" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "wrote" in output and (out / "splits" / "N6_seed1" / "train.xyz").is_file()
    assert not list(out.glob("runs/*/*/done.json"))
    finished = out / "runs" / "naive" / "N6_seed1" / "done.json"
    finished.parent.mkdir(parents=True)
    finished.write_text('{"fingerprint": "made with other settings"}')
    result = CliRunner().invoke(main, ["bench", str(config), "--out", str(out)])
    assert_one_line_error(result, "finished with different settings")
    result = CliRunner().invoke(main, ["bench", str(config), "--out", str(out), "--run-index", "2"])
    assert assert_one_line_error(result) == "Error: --run-index 2 is outside 0..1"
    result = CliRunner().invoke(main, ["bench", str(config), "--out", str(out), "--only", "lora"])
    assert_one_line_error(result, "--only lora: no trained run of")
    result = CliRunner().invoke(main, ["bench", str(config), "--out", str(out), "--seed", "7"])
    assert assert_one_line_error(result).endswith("--seed 7: no trained run of bench.yaml has it (0, 1)")


def test_a_chunk_of_the_grid_is_the_runs_with_every_asked_property():
    runs = [Run(i, method, n, seed) for i, (method, n, seed) in
            enumerate((m, n, s) for m in ("naive", "lora") for n in (10, 25) for s in (0, 1, 2))]
    assert chunk_of_grid(runs, (), (), (), "grid.yaml") == runs
    chunk = chunk_of_grid(runs, (), [25], [1, 2], "grid.yaml")
    assert [(r.method, r.n_train, r.seed) for r in chunk] == [("naive", 25, 1), ("naive", 25, 2), ("lora", 25, 1),
                                                             ("lora", 25, 2)]
    assert [r.index for r in chunk_of_grid(runs, ["lora"], [10], [0], "grid.yaml")] == [6]
    with pytest.raises(ProtoalignError, match=r"^--budget 50: no trained run of grid.yaml has it \(10, 25\)$"):
        chunk_of_grid(runs, (), [50], (), "grid.yaml")


def test_run_needs_only_its_own_source_products(tmp_path, tiny_model, molecules_xyz):
    # a method added to the config after its grid was prepared must not block the runs that do not use it
    config = write_config(tmp_path, tiny_model, molecules_xyz, "  - {method: naive}")
    out = tmp_path / "out"
    run_bench(config, "--out", out, "--slurm")
    settings, layout = load_config(config), BenchLayout(out)
    run = plan_runs(settings)[0]
    finished = layout.run_dir(run) / "done.json"
    finished.parent.mkdir(parents=True)
    finished.write_text(json.dumps({"fingerprint": run_fingerprint(settings, layout, run, {}), "method": "naive",
                                     "n_train": 6, "seed": 0, "energy_mae_mev": 1.0, "force_mae_mev_per_a": 2.0}))
    config.write_text(config.read_text().replace("  - {method: naive}", "  - {method: naive}\n  - {method: align, align_weight: 1.0}"))
    assert not list((out / "source").glob("prototypes*.h5"))
    result = CliRunner().invoke(main, ["bench", str(config), "--out", str(out), "--run-index", "0"])
    assert result.exit_code == 0 and "naive N=6 seed=0: test energy MAE 1.00 meV" in result.output, result.output
    result = CliRunner().invoke(main, ["bench", str(config), "--out", str(out), "--run-index", "2"])
    assert_one_line_error(result, "prototypes.h5 is missing")


@pytest.mark.slow
def test_multihead_lora_freeze_train_on_tiny_model(tmp_path, tiny_model, molecules_xyz):
    methods = """  - {method: naive}
  - {method: multihead, args: {num_samples_pt: 8}}
  - {method: lora, args: [--lora_rank, '2']}
  - {method: freeze, freeze: 1}"""
    config = write_config(tmp_path, tiny_model, molecules_xyz, methods)
    (tmp_path / "bench.yaml").write_text(config.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    run_bench(config, "--out", tmp_path / "out", "--jobs", "2")
    with open(tmp_path / "out" / "runs.csv") as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == ["naive", "multihead", "lora", "freeze"]


def test_a_run_with_a_stage_two_is_evaluated_on_its_stage_two_model(tmp_path):
    from protoalign_cli.bench.layout import final_model

    (tmp_path / "model.model").write_text("stage one")
    assert final_model(tmp_path) == tmp_path / "model.model"
    (tmp_path / "model_stagetwo.model").write_text("stage two")
    assert final_model(tmp_path) == tmp_path / "model_stagetwo.model"


def test_offset_refit_changes_only_the_energies_of_a_run(tmp_path, tiny_model, molecules_xyz):
    methods = """  - {method: naive}
  - {name: naive-refit, method: naive, refit_offset: true}"""
    config = write_config(tmp_path, tiny_model, molecules_xyz, methods)
    (tmp_path / "bench.yaml").write_text(config.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    out = tmp_path / "out"
    output = run_bench(config, "--out", out, "--jobs", "2")  # the refit waits for the training it shares
    with open(out / "runs.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    plain, refit = rows["naive"], rows["naive-refit"]
    assert not (out / "runs" / "naive-refit" / "N6_seed0" / "train.log").exists(), output  # naive's training reused
    assert refit["wall_time_s"] == plain["wall_time_s"]
    assert refit["setting"] == "offset refit" and plain["setting"] == ""
    assert float(refit["force_mae_mev_per_a"]) == pytest.approx(float(plain["force_mae_mev_per_a"]), rel=1e-9)
    assert float(refit["energy_mae_mev"]) != pytest.approx(float(plain["energy_mae_mev"]), rel=1e-6)
    done = json.loads((out / "runs" / "naive-refit" / "N6_seed0" / "done.json").read_text())
    assert done["evaluated_model"] == "model_refit.model" and done["offset_refit"]["configurations"] == 6
    assert done["trained_by"] == "runs/naive/N6_seed0"
    assert done["offset_refit"]["rmse_after"] < done["offset_refit"]["rmse_before"]
    assert done["fingerprint"] != json.loads((out / "runs" / "naive" / "N6_seed0" / "done.json").read_text())["fingerprint"]


def test_refit_offset_is_refused_where_nothing_trains(tmp_path, tiny_model, molecules_xyz):
    from protoalign_cli.bench.config import load_config

    methods = """  - {method: naive}
  - {name: best, method: select, from: [naive], refit_offset: true}"""
    with pytest.raises(ProtoalignError, match="refit_offset applies to methods that train"):
        load_config(write_config(tmp_path, tiny_model, molecules_xyz, methods))


def test_a_run_records_its_command_with_paths_a_reader_can_follow(tmp_path, monkeypatch):
    from protoalign_cli.bench.report import shown_command

    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / ".venv" / "bin" / "mace_run_train"), "--train_file", str(tmp_path / "splits" / "t.xyz"),
            "--seed", "0"]
    assert shown_command(argv) == [".venv/bin/mace_run_train", "--train_file", "splits/t.xyz", "--seed", "0"]
