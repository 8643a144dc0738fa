"""The command line as a whole: usage examples, outputs that cannot be written, cheap errors, Ctrl-C, the entry.

Every command is run on real files: the tiny MACE model, 24 labelled molecules, their latents and prototypes.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import TINY_BENCH, assert_one_line_error, assert_untouched, snapshot, unwritable_folder

from protoalign_cli import extract as extract_module
from protoalign_cli.cli import main
from protoalign_cli.io.outputs import partial_path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("extract", "merge-latents", "prototypes", "diagnose", "finetune", "bench", "tune")


def run_cli(*args):
    """Invoke ``protoalign`` in-process; return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def protoalign_process(*args, cwd=None, **popen) -> subprocess.Popen:
    """Start ``python -m protoalign_cli.cli ARGS`` (what torchrun and bench start) in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "protoalign_cli.cli", *map(str, args)], cwd=cwd, env=env,
                            text=True, **popen)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model, molecules_xyz) -> dict[str, Path]:
    """Valid inputs of every command: model, structures, latents, prototypes and a bench config."""
    from protoalign_cli.extract import ExtractRequest, run_extract
    from protoalign_cli.prototypes.build import PrototypesRequest, build_prototypes

    folder = tmp_path_factory.mktemp("cli_inputs")
    latents, prototypes, bench = folder / "latents.h5", folder / "prototypes.h5", folder / "bench.yaml"
    run_extract(ExtractRequest(model=str(tiny_model), configs=[molecules_xyz], out=latents, progress=False))
    build_prototypes(PrototypesRequest(latents=[latents], out=prototypes, k=2))
    bench.write_text(TINY_BENCH.format(model=tiny_model, target=molecules_xyz))
    candidates = folder / "candidates.yaml"
    candidates.write_text("mace_args: [--E0s, average, --batch_size, '2', --default_dtype, float64]\n"
                          "candidates: [{name: plain, method: naive}]\n")
    return {"model": tiny_model, "configs": molecules_xyz, "latents": latents, "prototypes": prototypes,
            "bench": bench, "candidates": candidates}


def command_writing_into(command: str, inputs: dict[str, Path], folder: Path) -> list:
    """The arguments of a valid run of ``command`` whose output goes into ``folder``."""
    return {
        "extract": ["extract", "--model", inputs["model"], "--configs", inputs["configs"], "--out", folder / "l.h5"],
        "merge-latents": ["merge-latents", inputs["latents"], "--out", folder / "merged.h5"],
        "prototypes": ["prototypes", inputs["latents"], "--k", "2", "--out", folder / "p.h5"],
        "diagnose": ["diagnose", "--prototypes", inputs["prototypes"], "--configs", inputs["configs"],
                     "--out", folder / "diagnosis"],
        "bench": ["bench", inputs["bench"], "--out", folder / "bench"],
        "tune": ["tune", "--foundation-model", inputs["model"], "--train", inputs["configs"], "--max-epochs", "1",
                 "--candidates", inputs["candidates"], "--out", folder / "tune"],
    }[command]


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_a_usage_example(command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0, result.output
    assert re.search(rf"^ +protoalign {command} \S", result.output, re.MULTILINE), result.output


def test_diagnose_names_the_finetuned_model_unambiguously_and_keeps_the_old_spelling(inputs, tmp_path, monkeypatch):
    help_text = run_cli("diagnose", "--help").output
    assert "--finetuned-model" in help_text and "--finetuned-head" in help_text
    assert not re.search(r"--model\b", help_text) and "--model-head" not in help_text
    requests = []

    def record(request):
        requests.append(request)
        return types.SimpleNamespace(verdict=["SAFE"], coverage=types.SimpleNamespace(overall=1.0))

    monkeypatch.setattr(importlib.import_module("protoalign_cli.diagnose"), "run_diagnose", record)
    common = ["diagnose", "--prototypes", inputs["prototypes"], "--configs", inputs["configs"], "--out", tmp_path / "d"]
    old = run_cli(*common, "--model", inputs["model"], "--model-head", "Default")  # scripts written before the rename
    new = run_cli(*common, "--finetuned-model", inputs["model"], "--finetuned-head", "Default")
    assert old.exit_code == 0 and new.exit_code == 0, (old.output, new.output)
    assert [(r.model, r.model_head) for r in requests] == [(inputs["model"], "Default")] * 2
    both = run_cli(*common, "--model", inputs["model"], "--finetuned-model", inputs["model"])
    assert_one_line_error(both, "--model is the old spelling of --finetuned-model")
    assert len(requests) == 2


# ----------------------------------------------------------------------------- outputs that cannot be written


def blocked_folder(tmp_path: Path, where: str) -> tuple[Path, str]:
    """A folder no output can go into, and the fragment of the error naming why.

    'under a file': a path below a file. 'unwritable': a read-only folder, or /sys when (as root)
    modes do not stop writes.
    """
    if where == "under a file":
        (tmp_path / "notes.txt").write_text("x")
        return tmp_path / "notes.txt", "notes.txt is a file, not a folder"
    locked = unwritable_folder(tmp_path)
    return locked, f"cannot write into {locked}"


@pytest.mark.parametrize("where", ["under a file", "unwritable"])
@pytest.mark.parametrize("command", ["extract", "merge-latents", "prototypes", "diagnose", "bench", "tune"])
def test_an_output_that_cannot_be_written_is_one_error_line_and_leaves_nothing(command, where, inputs, tmp_path):
    folder, expected = blocked_folder(tmp_path, where)
    before, inputs_before = snapshot(tmp_path), snapshot(inputs["latents"].parent)
    result = run_cli(*command_writing_into(command, inputs, folder))
    assert_one_line_error(result, expected)
    assert_untouched(tmp_path, before)
    assert_untouched(inputs["latents"].parent, inputs_before)


# ----------------------------------------------------------------------------- cheap errors come first

IMPORTED_HEAVY = """
import sys
from protoalign_cli.cli import main
try:
    main(sys.argv[1:], prog_name="protoalign")
finally:
    print("heavy modules imported:", sorted(m for m in ("torch", "mace") if m in sys.modules))
"""


@pytest.mark.parametrize("case", ["out exists", "partial file left", "configs missing", "out under a file",
                                  "max-configs 0"])
def test_extract_refuses_bad_options_before_importing_torch(case, inputs, tmp_path):
    out, configs, extra = tmp_path / "latents.h5", inputs["configs"], []
    if case == "out exists":
        out.write_text("older result\n")
    elif case == "partial file left":
        partial_path(out).write_text("interrupted\n")
    elif case == "configs missing":
        configs = tmp_path / "absent.xyz"
    elif case == "out under a file":
        (tmp_path / "notes.txt").write_text("x")
        out = tmp_path / "notes.txt" / "latents.h5"
    else:
        extra = ["--max-configs", "0"]
    before = snapshot(tmp_path)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IMPORTED_HEAVY, "extract", "--model", inputs["model"], "--configs",
                           configs, "--out", out, *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    assert done.returncode == 1
    assert_one_line_error(done.stderr)
    assert done.stdout.strip().splitlines()[-1] == "heavy modules imported: []", (done.stdout, seconds)
    assert_untouched(tmp_path, before)


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_extract_with_status_130_and_keeps_the_work_for_resume(inputs, tmp_path):
    """A real SIGINT to ``python -m protoalign_cli.cli extract`` over many configurations."""
    many = tmp_path / "many.xyz"
    many.write_text(Path(inputs["configs"]).read_text() * 100)  # 2400 configurations
    out = tmp_path / "latents.h5"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = protoalign_process("extract", "--model", inputs["model"], "--configs", many, "--out", out,
                                     "--batch-size", "1", stdout=subprocess.PIPE, stderr=stderr)
        deadline = time.monotonic() + 240
        while not partial_path(out).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "extract ended before it could be interrupted"
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=120)
        stdout = process.stdout.read()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert status == 130, stderr[-2000:]
    assert_one_line_error(stderr, f"Error: interrupted; {partial_path(out)} kept, rerun with --resume to continue",
                          alone=False)
    assert stdout == ""
    assert partial_path(out).is_file() and not out.exists()


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["extract", "merge-latents", "prototypes", "diagnose", "bench", "tune"])
def test_an_interrupted_command_exits_130_with_one_error_line(command, inputs, tmp_path, monkeypatch):
    target = {
        "extract": (extract_module, "_write_batch"),  # inside the loop: the partial file is kept for --resume
        "merge-latents": (extract_module, "merge_latents"),
        "prototypes": (sys.modules["protoalign_cli.cli.prototypes"], "build_prototypes"),
        "diagnose": (importlib.import_module("protoalign_cli.diagnose"), "run_diagnose"),
        "bench": (importlib.import_module("protoalign_cli.bench.schedule"), "run_grid"),
        "tune": (importlib.import_module("protoalign_cli.tune.run"), "run_pool"),  # while trainings run
    }[command]
    monkeypatch.setattr(*target, interrupt)
    result = run_cli(*command_writing_into(command, inputs, tmp_path))
    line = assert_one_line_error(result, exit_code=130, alone=command != "tune")  # tune said what it would run
    if command == "extract":
        assert line == f"Error: interrupted; {partial_path(tmp_path / 'l.h5')} kept, rerun with --resume to continue"
        assert partial_path(tmp_path / "l.h5").is_file()
    elif command == "tune":
        assert line == "Error: interrupted; finished trainings are kept; rerun the same command to resume"
    else:
        assert line == "Error: interrupted"


# ----------------------------------------------------------------------------- the entry and the thin layer


def test_the_module_entry_runs_the_command_line():
    process = protoalign_process("--version", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.startswith("protoalign, version ")


def test_the_library_never_imports_click_or_the_command_line():
    offenders = []
    for path in sorted((ROOT / "protoalign_cli").rglob("*.py")):
        if path.relative_to(ROOT / "protoalign_cli").parts[0] == "cli":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"protoalign_cli\.cli\b|import click", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
