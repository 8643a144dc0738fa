"""protoalign finetune's command line without training: an earlier run, unwritable output folders, errors
found before torch is imported, the `--` hint, the option names. (Real runs: tests/test_finetune.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, assert_untouched, snapshot, unwritable_folder

from protoalign_cli.cli import main


def run_cli(*args):
    """Invoke ``protoalign`` in-process; return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def mace_args(work_dir: str, train_file: str = "train.xyz", *extra: str) -> list[str]:
    """mace_run_train arguments naming a run 'tiny' (seed 1) in ``work_dir``."""
    return ["--name", "tiny", "--seed", "1", "--work_dir", work_dir, "--foundation_model", "foundation.model",
            "--train_file", train_file, "--max_num_epochs", "1", *extra]


@pytest.fixture
def inputs(tmp_path, monkeypatch) -> Path:
    """A folder (the working directory) with a prototype file and a training file; the checks here read neither."""
    monkeypatch.chdir(tmp_path)
    for name in ("prototypes.h5", "train.xyz", "foundation.model"):
        (tmp_path / name).write_text("not read\n")
    return tmp_path


def earlier_run(folder: Path, *files: str) -> str:
    """``run/`` holding ``files`` (what a finished or interrupted run leaves)."""
    for name in files:
        (folder / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "run" / name).write_text(json.dumps({"status": "finished"}))
    return "run"


@pytest.mark.parametrize("case, fragments", [
    ("finished run", ["run/tiny.model exists", "--overwrite", "--restart_latest"]),
    ("interrupted run", ["run/checkpoints/tiny_run-1_epoch-0.pt exists", "--overwrite"]),
    ("run record", ["run/protoalign_finetune.json exists", "--overwrite"]),
    ("overwrite and restart", ["--overwrite starts the run afresh", "--restart_latest resumes it"]),
    ("work dir under a file", ["cannot write into notes.txt/run: notes.txt is a file"]),
    ("work dir read-only", ["cannot write into"]),
])
def test_refused_before_anything_runs(case, fragments, inputs):
    options, extra, work_dir = [], [], "run"
    if case == "finished run":
        earlier_run(inputs, "tiny.model", "checkpoints/tiny_run-1_epoch-1.pt", "protoalign_finetune.json")
    elif case == "interrupted run":
        earlier_run(inputs, "checkpoints/tiny_run-1_epoch-0.pt", "logs/tiny_run-1.log")
    elif case == "run record":
        earlier_run(inputs, "protoalign_finetune.json")
    elif case == "overwrite and restart":
        options, extra = ["--overwrite"], ["--restart_latest"]
    elif case == "work dir under a file":
        (inputs / "notes.txt").write_text("x")
        work_dir = "notes.txt/run"
    else:
        work_dir = str(unwritable_folder(inputs) / "run")
    before, folders = snapshot(inputs), sorted(p for p in inputs.rglob("*") if p.is_dir())
    result = run_cli("finetune", "--prototypes", "prototypes.h5", *options, "--",
                     *mace_args(work_dir, "train.xyz", *extra))
    assert_one_line_error(result, *fragments)
    assert_untouched(inputs, before)
    assert sorted(p for p in inputs.rglob("*") if p.is_dir()) == folders


CHEAP_ERRORS = """
import sys
from protoalign_cli.cli import main

for argv in {cases!r}:
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(name for name in ("torch", "mace.tools", "e3nn") if name in sys.modules))
"""


def test_cheap_errors_are_found_before_torch_is_imported(inputs):
    """Missing training file, batch size 0, an earlier run, a --work_dir under a file: no 10-20 s of imports."""
    earlier_run(inputs, "tiny.model")
    (inputs / "notes.txt").write_text("x")
    finetune = ["finetune", "--prototypes", "prototypes.h5"]
    cases = [[*finetune, "--", *mace_args("fresh", "absent.xyz")],
             [*finetune, "--assignment-batch-size", "0", "--", *mace_args("fresh")],
             [*finetune, "--", *mace_args("run")],
             [*finetune, "--", *mace_args("notes.txt/run")]]
    done = subprocess.run([sys.executable, "-c", CHEAP_ERRORS.format(cases=cases)], cwd=inputs, capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 4, done.stderr
    for error, fragment in zip(errors, ["train file absent.xyz does not exist", "--assignment-batch-size must be >= 1",
                                        "run/tiny.model exists", "notes.txt is a file"]):
        assert fragment in error
    assert done.stdout.strip() == "[]", done.stdout  # none of torch, mace.tools, e3nn imported


def test_forgotten_dashes_get_a_hint(inputs):
    result = run_cli("finetune", "--prototypes", "prototypes.h5", *mace_args("run"))
    assert_one_line_error(result, "No such option '--name'", "mace_run_train options go after `--`",
                          exit_code=2, alone=False)


def test_help_tells_the_two_batch_sizes_apart_and_gives_lambda_no_unit():
    help_text = " ".join(run_cli("finetune", "--help").output.split())
    assert "--assignment-batch-size" in help_text and "mace's own --batch_size goes after `--`" in help_text
    assert "--batch-size" not in help_text.replace("--assignment-batch-size", "")  # the old name: a hidden alias
    assert "λ (dimensionless)" in help_text and "term (eV²)" not in help_text
    assert "--max_num_epochs" in help_text and "--work_dir" in help_text  # the example is a bounded run
