"""Bad input to every command, as one table: each case must end in exactly one ``Error:`` line (the last line
of stderr), a non-zero exit, no traceback, every file that was there before byte-identical, and nothing new
(no output, no ``.partial`` file, no folder).

Each case builds its inputs in a fresh folder (the working directory while the command runs) from a kit of
real files shared by the table: the tiny MACE model, another model, 24 labelled molecules, their latents
and prototypes. The commands run in-process through click's CliRunner; one case runs ``python -m
protoalign_cli.cli`` in a subprocess to see what a shell sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import TINY_BENCH, assert_one_line_error, assert_untouched, snapshot, unwritable_folder
from prototype_files import split_into_shards, write_synthetic_latents

from protoalign_cli.cli import main


@dataclasses.dataclass(frozen=True)
class Kit:
    """Real, valid inputs shared by every case (never written to by a case)."""

    folder: Path
    model: Path        # tiny ScaleShiftMACE (H, C, N, O)
    other_model: Path  # another tiny model (two heads): a different sha256
    train: Path        # 24 rattled molecules with REF_energy (eV) and REF_forces (eV/Å)
    latents: Path      # the tiny model's latents over ``train``
    prototypes: Path   # K = 2 prototypes per element of ``latents``

    def frames(self) -> list:
        """Fresh ase.Atoms of ``train`` (free to spoil)."""
        import ase.io

        return ase.io.read(self.train, ":")


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_model, tiny_two_head_model, molecules_xyz) -> Kit:
    from protoalign_cli.extract import ExtractRequest, run_extract
    from protoalign_cli.prototypes.build import PrototypesRequest, build_prototypes

    folder = tmp_path_factory.mktemp("bad_inputs_kit")
    model, other, train = (Path(shutil.copy(p, folder)) for p in (tiny_model, tiny_two_head_model, molecules_xyz))
    latents, prototypes = folder / "latents.h5", folder / "prototypes.h5"
    run_extract(ExtractRequest(model=str(model), configs=[train], out=latents))
    build_prototypes(PrototypesRequest(latents=[latents], out=prototypes, k=2))
    return Kit(folder, model, other, train, latents, prototypes)


# ----------------------------------------------------------------------------- building blocks of the cases

def write(folder: Path, name: str, content: str | bytes) -> str:
    """Write a file below ``folder`` (text or bytes), creating its parent; return ``name``."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return name


def write_frames(folder: Path, name: str, frames: list) -> str:
    """Write configurations as extxyz; return ``name``."""
    import ase.io

    ase.io.write(folder / name, frames, format="extxyz")
    return name


def spoiled(kit: Kit, how: str) -> list:
    """The kit's molecules with configuration 5 spoiled (or every configuration, for 'no energy key')."""
    frames = kit.frames()
    atoms = frames[5]
    if how == "nan energy":
        atoms.info["REF_energy"] = math.nan
    elif how == "inf force":
        atoms.arrays["REF_forces"][1, 2] = math.inf
    elif how == "nan position":
        atoms.positions[2, 0] = math.nan
    elif how == "unknown element":
        atoms.numbers[0] = 26  # Fe
    elif how == "no energy key":
        for each in frames:
            del each.info["REF_energy"]
    else:
        raise ValueError(how)
    return frames


def spoiled_file(folder: Path, kit: Kit, how: str) -> str:
    """The kit's molecules spoiled (``spoiled``) as ``t.xyz`` in ``folder``; return its name."""
    return write_frames(folder, "t.xyz", spoiled(kit, how))


def copy_of(folder: Path, path: Path, name: str) -> str:
    """A copy of ``path`` in ``folder`` under ``name``; return ``name``."""
    shutil.copy(path, folder / name)
    return name


def with_nan_latent(folder: Path, kit: Kit) -> str:
    """A copy of the kit's latent file with one latent value NaN."""
    import h5py

    name = copy_of(folder, kit.latents, "nan.h5")
    with h5py.File(folder / name, "r+") as handle:
        handle["latent"][3, 1] = math.nan
    return name


def with_model_path(folder: Path, kit: Kit, model_path: str) -> str:
    """A copy of the kit's prototype file that names another pretrained model path."""
    import h5py

    name = copy_of(folder, kit.prototypes, "moved.h5")
    with h5py.File(folder / name, "r+") as handle:
        handle.attrs["model_path"] = model_path
    return name


def extract(kit: Kit, *extra, model=None, configs=None, out="latents.h5") -> list:
    return ["extract", "--model", model or kit.model, "--configs", configs or kit.train, "--out", out, *extra]


def merge(*inputs, out="merged.h5") -> list:
    return ["merge-latents", *inputs, "--out", out]


def prototypes(kit: Kit, *extra, latents=None, out="prototypes.h5") -> list:
    return ["prototypes", *(latents or [kit.latents]), "--out", out, "--k", "2", *extra]


def diagnose(kit: Kit, *extra, protos=None, configs=None, out="diagnosis") -> list:
    return ["diagnose", "--prototypes", protos or kit.prototypes, "--configs", configs or kit.train, "--out", out,
            *extra]


def mace_args(kit: Kit, *extra, train=None, work_dir="run", foundation=None) -> list:
    """mace_run_train arguments of a 1-epoch fine-tuning of the tiny model (float64, CPU)."""
    return ["--name", "tiny", "--seed", "1", "--work_dir", work_dir, "--foundation_model", foundation or kit.model,
            "--train_file", train or kit.train, "--valid_fraction", "0.25", "--energy_key", "REF_energy",
            "--forces_key", "REF_forces", "--E0s", "foundation", "--max_num_epochs", "1", "--batch_size", "4",
            "--default_dtype", "float64", "--device", "cpu", *extra]


def finetune(kit: Kit, *options, protos=None, **mace) -> list:
    return ["finetune", "--prototypes", protos or kit.prototypes, *options, "--", *mace_args(kit, **mace)]


def without(argv: list, option: str) -> list:
    """``argv`` without ``option`` and its value."""
    at = argv.index(option)
    return argv[:at] + argv[at + 2:]


def finished_run(folder: Path, kit: Kit) -> list:
    """What a finished ``finetune`` run named tiny (seed 1) leaves in ``run/``; then the same command again."""
    for name in ("run/tiny.model", "run/checkpoints/tiny_run-1_epoch-0.pt"):
        write(folder, name, kit.model.read_bytes())
    write(folder, "run/logs/tiny_run-1.log", "INFO: Training complete\n")
    write(folder, "run/results/tiny_run-1_train.txt", '{"mode": "eval", "epoch": 0, "loss": 0.1}\n')
    write(folder, "run/protoalign/align_tiny_run-1.jsonl", '{"epoch": 0, "initial": false, "lambda": 0.01}\n')
    record = {"command": "finetune", "inputs": {"prototypes": str(kit.prototypes), "mace_args": mace_args(kit)},
              "results": {"status": "finished", "epochs_logged": 1}}
    write(folder, "run/protoalign_finetune.json", json.dumps(record, indent=2, default=str) + "\n")
    return finetune(kit)




def bench(folder: Path, kit: Kit, *extra, old: str = "", new: str = "") -> list:
    """``bench bench.yaml --out out``, the config being the valid tiny one with ``old`` replaced by ``new``."""
    text = TINY_BENCH.format(model=kit.model, target=kit.train)
    assert old in text
    write(folder, "bench.yaml", text.replace(old, new) if old else text)
    return ["bench", "bench.yaml", "--out", "out", *extra]


def tune(kit: Kit, *extra, train=None, foundation=None, out="tune_out") -> list:
    """``tune`` of the kit's molecules with the tiny model (it would train 2 epochs if nothing stopped it)."""
    return ["tune", "--foundation-model", foundation or kit.model, "--train", train or kit.train,
            "--max-epochs", "2", "--out", out, *extra]


# ----------------------------------------------------------------------------- the table

Build = Callable[[Path, Kit], list]
RANDOM_P = b"P" + np.random.default_rng(0).bytes(3000)  # torch's error for a leading P or Q spans two lines

CASES: list[tuple[str, Build]] = [
    # extract
    ("extract/configs-missing", lambda d, k: extract(k, configs="absent.xyz")),
    ("extract/configs-empty", lambda d, k: extract(k, configs=write(d, "empty.xyz", ""))),
    ("extract/configs-text", lambda d, k: extract(k, configs=write(d, "notes.xyz", "hello\nnot a structure\n"))),
    ("extract/configs-unknown-element", lambda d, k: extract(k, configs=spoiled_file(d, k, "unknown element"))),
    ("extract/configs-twice", lambda d, k: extract(k, "--configs", k.train)),
    ("extract/model-missing", lambda d, k: extract(k, model="absent.model")),
    ("extract/model-text", lambda d, k: extract(k, model=write(d, "notes.model", "not a model\n"))),
    ("extract/model-random-bytes", lambda d, k: extract(k, model=write(d, "random.model", RANDOM_P))),
    ("extract/model-is-hdf5", lambda d, k: extract(k, model=k.latents)),
    ("extract/model-is-folder", lambda d, k: extract(k, model=write(d, "models/readme.txt", "x") and "models")),
    ("extract/head-unknown", lambda d, k: extract(k, "--head", "nope")),
    ("extract/batch-size-0", lambda d, k: extract(k, "--batch-size", "0")),
    ("extract/max-configs-0", lambda d, k: extract(k, "--max-configs", "0")),
    ("extract/shard-reversed", lambda d, k: extract(k, "--shard", "3/2")),
    ("extract/shard-words", lambda d, k: extract(k, "--shard", "first/half")),
    ("extract/shard-selects-nothing", lambda d, k: extract(k, "--max-configs", "2", "--shard", "3/4")),
    ("extract/out-exists", lambda d, k: extract(k, out=write(d, "latents.h5", "an older result\n"))),
    ("extract/out-partial-left", lambda d, k: write(d, ".latents.h5.partial", "interrupted\n") and extract(k)),
    ("extract/out-folder-missing", lambda d, k: extract(k, out="nowhere/latents.h5")),
    ("extract/out-under-a-file", lambda d, k: extract(k, out=write(d, "notes.txt", "x") + "/latents.h5")),
    ("extract/out-unwritable", lambda d, k: extract(k, out=str(unwritable_folder(d) / "latents.h5"))),
    # merge-latents
    ("merge/input-missing", lambda d, k: merge(k.latents, "absent.h5")),
    ("merge/input-text", lambda d, k: merge(k.latents, write(d, "notes.h5", "not hdf5\n"))),
    ("merge/input-twice", lambda d, k: merge(k.latents, k.latents)),
    ("merge/other-model", lambda d, k: merge(k.latents, write_synthetic_latents(d / "o.h5", {1: 2}, model_sha256="b" * 64))),
    ("merge/same-atoms-twice", lambda d, k: merge(k.latents, copy_of(d, k.latents, "copy.h5"))),
    ("merge/out-exists", lambda d, k: merge(*split_into_shards(k.latents, 2, d), out=write(d, "merged.h5", "old\n"))),
    ("merge/out-under-a-file", lambda d, k: merge(*split_into_shards(k.latents, 2, d), out=write(d, "n.txt", "x") + "/m.h5")),
    ("merge/out-unwritable", lambda d, k: merge(*split_into_shards(k.latents, 2, d), out=str(unwritable_folder(d) / "m.h5"))),
    # prototypes
    ("prototypes/latents-missing", lambda d, k: prototypes(k, latents=["absent.h5"])),
    ("prototypes/latents-text", lambda d, k: prototypes(k, latents=[write(d, "notes.h5", "not hdf5\n")])),
    ("prototypes/latents-is-model", lambda d, k: prototypes(k, latents=[k.model])),
    ("prototypes/latents-is-prototypes", lambda d, k: prototypes(k, latents=[k.prototypes])),
    ("prototypes/latents-nan", lambda d, k: prototypes(k, latents=[with_nan_latent(d, k)])),
    ("prototypes/shard-missing", lambda d, k: prototypes(k, latents=split_into_shards(k.latents, 3, d)[:2])),
    ("prototypes/k-0", lambda d, k: prototypes(k, "--k", "0")),
    ("prototypes/k-negative", lambda d, k: prototypes(k, "--k", "-3")),
    ("prototypes/k-word", lambda d, k: prototypes(k, "--k", "many")),
    ("prototypes/k-above-atoms", lambda d, k: prototypes(k, "--k", "500")),
    ("prototypes/k-grid-word", lambda d, k: prototypes(k, "--k", "auto", "--k-grid", "2,x")),
    ("prototypes/niter-0", lambda d, k: prototypes(k, "--niter", "0")),
    ("prototypes/out-exists", lambda d, k: prototypes(k, out=write(d, "prototypes.h5", "old\n"))),
    ("prototypes/summary-exists", lambda d, k: write(d, "prototypes.h5.json", "{}\n") and prototypes(k)),
    ("prototypes/out-is-input", lambda d, k: prototypes(k, "--overwrite", latents=[copy_of(d, k.latents, "l.h5")], out="l.h5")),
    ("prototypes/out-under-a-file", lambda d, k: prototypes(k, out=write(d, "notes.txt", "x") + "/prototypes.h5")),
    ("prototypes/out-unwritable", lambda d, k: prototypes(k, out=str(unwritable_folder(d) / "prototypes.h5"))),
    # diagnose
    ("diagnose/prototypes-missing", lambda d, k: diagnose(k, protos="absent.h5")),
    ("diagnose/prototypes-text", lambda d, k: diagnose(k, protos=write(d, "notes.h5", "not hdf5\n"))),
    ("diagnose/prototypes-is-latents", lambda d, k: diagnose(k, protos=k.latents)),
    ("diagnose/foundation-other-model", lambda d, k: diagnose(k, "--foundation-model", k.other_model)),
    ("diagnose/foundation-gone", lambda d, k: diagnose(k, protos=with_model_path(d, k, str(d / "gone.model")))),
    ("diagnose/configs-missing", lambda d, k: diagnose(k, configs="absent.xyz")),
    ("diagnose/configs-empty", lambda d, k: diagnose(k, configs=write(d, "empty.xyz", ""))),
    ("diagnose/configs-unknown-element", lambda d, k: diagnose(k, configs=spoiled_file(d, k, "unknown element"))),
    ("diagnose/energy-key-typo", lambda d, k: diagnose(k, "--energy-key", "REF_enrgy")),
    ("diagnose/nan-energy", lambda d, k: diagnose(k, configs=spoiled_file(d, k, "nan energy"))),
    ("diagnose/inf-force", lambda d, k: diagnose(k, configs=spoiled_file(d, k, "inf force"))),
    ("diagnose/nan-position", lambda d, k: diagnose(k, configs=spoiled_file(d, k, "nan position"))),
    ("diagnose/finetuned-model-missing", lambda d, k: diagnose(k, "--finetuned-model", "absent.model")),
    ("diagnose/finetuned-head-unknown", lambda d, k: diagnose(k, "--finetuned-model", k.model, "--finetuned-head", "nope")),
    ("diagnose/radius-factor-0", lambda d, k: diagnose(k, "--radius-factor", "0")),
    ("diagnose/coverage-above-1", lambda d, k: diagnose(k, "--fail-below-coverage", "2")),
    ("diagnose/out-exists", lambda d, k: write(d, "diagnosis/report.md", "old\n") and diagnose(k)),
    ("diagnose/out-under-a-file", lambda d, k: diagnose(k, out=write(d, "notes.txt", "x") + "/diagnosis")),
    ("diagnose/out-unwritable", lambda d, k: diagnose(k, out=str(unwritable_folder(d) / "diagnosis"))),
    # finetune
    ("finetune/without-dashes", lambda d, k: [a for a in finetune(k) if a != "--"]),
    ("finetune/prototypes-missing", lambda d, k: finetune(k, protos="absent.h5")),
    ("finetune/no-foundation-model", lambda d, k: without(finetune(k), "--foundation_model")),
    ("finetune/unknown-mace-option", lambda d, k: finetune(k) + ["--learning_rat", "0.1"]),
    ("finetune/foundation-other-model", lambda d, k: finetune(k, foundation=k.other_model)),
    ("finetune/train-file-missing", lambda d, k: finetune(k, train="absent.xyz")),
    ("finetune/negative-weight", lambda d, k: finetune(k, "--align-weight", "-1")),
    ("finetune/batch-size-0", lambda d, k: finetune(k, "--batch-size", "0")),
    ("finetune/nan-energy", lambda d, k: finetune(k, train=spoiled_file(d, k, "nan energy"))),
    ("finetune/inf-force", lambda d, k: finetune(k, train=spoiled_file(d, k, "inf force"))),
    ("finetune/no-energy-key", lambda d, k: finetune(k, train=spoiled_file(d, k, "no energy key"))),
    ("finetune/finished-work-dir", finished_run),
    ("finetune/work-dir-under-a-file", lambda d, k: finetune(k, work_dir=write(d, "notes.txt", "x") + "/run")),
    ("finetune/work-dir-unwritable", lambda d, k: finetune(k, work_dir=str(unwritable_folder(d) / "run"))),
    # bench
    ("bench/config-missing", lambda d, k: ["bench", "absent.yaml", "--out", "out"]),
    ("bench/config-not-yaml", lambda d, k: ["bench", write(d, "bench.yaml", "name: [unclosed\n"), "--out", "out"]),
    ("bench/config-not-a-mapping", lambda d, k: ["bench", write(d, "bench.yaml", "- naive\n- align\n"), "--out", "out"]),
    ("bench/key-missing", lambda d, k: bench(d, k, old="seeds: [0]\n")),
    ("bench/key-unknown", lambda d, k: bench(d, k, old="seeds: [0]\n", new="seeds: [0]\nepochs: 3\n")),
    ("bench/method-unknown", lambda d, k: bench(d, k, old="{method: naive}", new="{method: teleport}")),
    ("bench/method-twice", lambda d, k: bench(d, k, old="{method: naive}", new="{method: naive}\n  - {method: naive}")),
    ("bench/split-overlap", lambda d, k: bench(d, k, old="valid: [12, 16]", new="valid: [10, 16]")),
    ("bench/split-reversed", lambda d, k: bench(d, k, old="pool: [0, 12]", new="pool: [12, 0]")),
    ("bench/budget-above-pool", lambda d, k: bench(d, k, old="budgets: [6]", new="budgets: [50]")),
    ("bench/mace-args-harness-option", lambda d, k: bench(d, k, old="E0s: estimated", new="E0s: estimated, seed: 3")),
    ("bench/target-missing", lambda d, k: bench(d, k, old=str(k.train), new="absent.xyz")),
    ("bench/jobs-0", lambda d, k: bench(d, k, "--jobs", "0")),
    ("bench/only-unknown-method", lambda d, k: bench(d, k, "--only", "lora")),
    # tune
    ("tune/no-energy-labels", lambda d, k: tune(k, train=spoiled_file(d, k, "no energy key"))),
    ("tune/nan-energy", lambda d, k: tune(k, train=spoiled_file(d, k, "nan energy"))),
    ("tune/inf-force", lambda d, k: tune(k, train=spoiled_file(d, k, "inf force"))),
    ("tune/too-few-for-folds", lambda d, k: tune(k, "--folds", "5", train=write_frames(d, "t.xyz", k.frames()[:4]))),
    ("tune/unknown-element", lambda d, k: tune(k, train=spoiled_file(d, k, "unknown element"))),
    ("tune/prototypes-other-model", lambda d, k: tune(k, "--prototypes", k.prototypes, foundation=k.other_model)),
    ("tune/out-is-a-file", lambda d, k: tune(k, out=write(d, "tune_out", "an older result\n"))),
    ("tune/out-other-settings", lambda d, k: write(d, "tune_out/tune.json", '{"max_epochs": 5}\n') and tune(k)),
    ("tune/valid-and-folds", lambda d, k: tune(k, "--valid", k.train, "--folds", "3")),
    ("tune/valid-fraction-0", lambda d, k: tune(k, "--valid-fraction", "0")),
    ("tune/valid-fraction-1.5", lambda d, k: tune(k, "--valid-fraction", "1.5")),
    ("tune/candidates-unknown-key", lambda d, k: tune(k, "--candidates", write(
        d, "candidates.yaml", "- {name: lr3e-3, method: naive, epochs: 3}\n"))),
]
IN_A_SUBPROCESS = {"finetune/without-dashes"}  # what the shell sees, once


def run_command(argv: list[str], folder: Path, in_subprocess: bool) -> tuple[int, str, str]:
    """Run ``protoalign ARGV`` in ``folder``; return (exit status, stdout, stderr).

    In-process, an exception that escapes the command (a traceback in a real run) fails the case here.
    """
    argv = [str(a) for a in argv]
    if in_subprocess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "protoalign_cli.cli", *argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout, done.stderr
    result = CliRunner().invoke(main, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        escaped = " ".join(f"{type(result.exception).__name__}: {result.exception}".split())
        pytest.fail(f"uncaught {escaped[:400]} (a traceback in a real run); stderr: {result.stderr[-400:]!r}")
    return result.exit_code, result.stdout, result.stderr


def folders(root: Path) -> list[str]:
    """Every folder below ``root`` (relative paths), hidden ones included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


def make_writable(root: Path) -> None:
    """Undo ``unwritable_folder`` so that the case folder can be cleaned up."""
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def test_the_bench_config_of_the_table_is_valid(tmp_path, kit):
    from protoalign_cli.bench.config import load_config

    bench(tmp_path, kit)
    assert [m.name for m in load_config(tmp_path / "bench.yaml").methods] == ["naive"]


def test_the_table_covers_every_command_with_at_least_40_cases():
    assert len(CASES) >= 40 and len({name for name, _ in CASES}) == len(CASES)
    assert {name.split("/")[0] for name, _ in CASES} == {"extract", "merge", "prototypes", "diagnose", "finetune",
                                                         "bench", "tune"}


@pytest.mark.parametrize("name,build", CASES, ids=[name for name, _ in CASES])
def test_bad_input(name, build, kit, tmp_path, monkeypatch):
    folder = tmp_path / "case"
    folder.mkdir()
    argv = build(folder, kit)
    monkeypatch.chdir(folder)
    before, kit_before, folders_before = snapshot(folder), snapshot(kit.folder), folders(folder)
    try:
        status, stdout, stderr = run_command(argv, folder, name in IN_A_SUBPROCESS)
        assert status != 0, f"exit status 0; stdout: {stdout[-400:]!r}"
        assert_one_line_error(stderr, alone=False)
        assert [line for line in stderr.splitlines() if line.startswith("Error:")] == [stderr.strip().splitlines()[-1]]
        assert "Traceback" not in stdout and "Error:" not in stdout, stdout
        assert_untouched(folder, before)
        assert folders(folder) == folders_before, sorted(set(folders(folder)) - set(folders_before))
        assert_untouched(kit.folder, kit_before)
    finally:
        make_writable(folder)
