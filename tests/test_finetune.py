"""protoalign finetune on tiny models: identity at λ = 0, the term at λ > 0, multihead replay,
stage two (SWA), --restart_latest, the assignment cache, and every kind of bad input.

Real mace_run_train runs (in-process, CPU, float64, a few epochs of a tiny MACE on 24 molecules);
the prototypes are built by ``protoalign extract`` + ``protoalign prototypes`` from the tiny model
over its own molecules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mace  # noqa: F401  (before e3nn/torch users)
import torch
from helpers import assert_one_line_error

from protoalign_cli.cli import main
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.finetune import mace_process_state

EPOCHS = 3


def run_cli(*args):
    """Invoke ``protoalign`` in-process; return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def mace_args(work_dir: Path, foundation: Path, train_file: Path, epochs: int = EPOCHS, *extra) -> list[str]:
    """mace_run_train arguments of a tiny, fast, deterministic fine-tuning run."""
    return [
        "--name", "tiny", "--seed", "1", "--work_dir", str(work_dir), "--foundation_model", str(foundation),
        "--train_file", str(train_file), "--valid_fraction", "0.25", "--energy_key", "REF_energy",
        "--forces_key", "REF_forces", "--E0s", "foundation", "--max_num_epochs", str(epochs),
        "--batch_size", "4", "--valid_batch_size", "6", "--default_dtype", "float64", "--device", "cpu",
        "--plot", "False", *[str(e) for e in extra],
    ]


def finetune(prototypes: Path, args: list[str], *options) -> str:
    """Run ``protoalign finetune`` in-process, require success; return its standard output (mace's console)."""
    result = run_cli("finetune", "--prototypes", prototypes, *options, "--", *args)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result.stdout


def plain_mace(args: list[str]) -> None:
    """Run the official mace_run_train entry point (``mace.cli.run_train.main``) in-process."""
    from mace.cli import run_train

    with mace_process_state(args):
        run_train.main()


def records(work_dir: Path) -> list[dict]:
    """The JSON lines the alignment term wrote for the tiny run in ``work_dir``."""
    path = work_dir / "protoalign" / "align_tiny_run-1.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def epoch_records(lines: list[dict]) -> dict[int, dict]:
    """Per-epoch records (not the initial evaluation) by epoch; later lines win (restarts)."""
    return {r["epoch"]: r for r in lines if "event" not in r and not r["initial"]}


def model_state(work_dir: Path) -> dict:
    """State dict of the final model mace_run_train saved."""
    return torch.load(work_dir / "tiny.model", map_location="cpu", weights_only=False).state_dict()


def metrics(work_dir: Path) -> list[dict]:
    """MACE's per-evaluation metrics (results/*_train.txt) without the wall times."""
    lines = (work_dir / "results" / "tiny_run-1_train.txt").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in row.items() if k != "time"} for row in rows if row.get("mode") == "eval"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, molecules_xyz, prototypes_file) -> dict[str, Path]:
    """Work folders of: plain mace_run_train, finetune at λ = 0, finetune at λ = 1 with a 3-epoch warmup
    (--verbose). Each finetune's standard output is kept next to its folder (``<name>.stdout``)."""
    root = tmp_path_factory.mktemp("runs")
    folders = {name: root / name for name in ("plain", "zero", "aligned", "latent")}
    plain_mace(mace_args(folders["plain"], tiny_model, molecules_xyz))
    stdout = finetune(prototypes_file, mace_args(folders["zero"], tiny_model, molecules_xyz), "--align-weight", "0")
    (root / "zero.stdout").write_text(stdout)
    stdout = finetune(prototypes_file, mace_args(folders["latent"], tiny_model, molecules_xyz), "--align-weight", "0",
                      "--latent-weight", "0", "--latent-target", "pretrained", "--refit-offset")
    (root / "latent.stdout").write_text(stdout)
    stdout = finetune(prototypes_file, mace_args(folders["aligned"], tiny_model, molecules_xyz),
                      "--align-weight", "1", "--align-warmup-epochs", "3", "--verbose")
    (root / "aligned.stdout").write_text(stdout)
    return folders


def test_zero_weight_trains_exactly_like_plain_mace(runs):
    plain, zero = model_state(runs["plain"]), model_state(runs["zero"])
    assert plain.keys() == zero.keys()
    for name in plain:
        assert torch.equal(plain[name], zero[name]), name
    assert metrics(runs["zero"]) == metrics(runs["plain"])
    assert len(metrics(runs["plain"])) == EPOCHS + 1
    logged = epoch_records(records(runs["zero"]))
    assert sorted(logged) == list(range(EPOCHS))
    assert all(r["lambda"] == 0 and r["train"]["align"] > 0 for r in logged.values())


def test_latent_term_at_zero_weight_trains_exactly_like_plain_mace_and_the_refit_is_a_separate_model(runs):
    plain, latent = model_state(runs["plain"]), model_state(runs["latent"])
    for name in plain:
        assert torch.equal(plain[name], latent[name]), name
    logged = epoch_records(records(runs["latent"]))
    assert all(r["latent_lambda"] == 0 and r["train"]["latent"] > 0 for r in logged.values())
    initial = next(r for r in records(runs["latent"]) if r.get("initial"))
    assert initial["valid"]["Default"]["latent"] < 1e-20  # the 'pretrained' target is 0 at the foundation model
    record = json.loads((runs["latent"] / "protoalign_finetune.json").read_text())
    assert record["inputs"]["latent_settings"]["target"] == "pretrained"
    refit = record["results"]["offset_refit"]
    assert refit["configurations"] == 18 and refit["rmse_after"] < refit["rmse_before"]
    assert record["results"]["model"] == str(runs["latent"] / "tiny_refit.model")
    refit_state = torch.load(runs["latent"] / "tiny_refit.model", map_location="cpu", weights_only=False).state_dict()
    changed = [name for name in plain if not torch.equal(plain[name], refit_state[name])]
    assert changed == ["atomic_energies_fn.atomic_energies"]
    assert f"fine-tuned model {runs['latent'] / 'tiny_refit.model'}" in (runs["latent"].parent / "latent.stdout").read_text()


def test_zero_weight_in_a_fresh_work_dir_trains_exactly_like_plain_mace(tmp_path, tiny_model, molecules_xyz,
                                                                        prototypes_file):
    """Each run in its own process, finetune computing the assignment (no cache): the assignment's forward
    pass must leave nothing behind (it warmed TorchScript's executors: weights differed by ~1e-16)."""
    plain_args = mace_args(tmp_path / "plain", tiny_model, molecules_xyz)
    zero_args = mace_args(tmp_path / "zero", tiny_model, molecules_xyz)
    commands = [[sys.executable, "-m", "mace.cli.run_train", *plain_args],
                [sys.executable, "-m", "protoalign_cli.cli", "finetune", "--prototypes", str(prototypes_file),
                 "--align-weight", "0", "--", *zero_args]]
    processes = [subprocess.run(command, capture_output=True, text=True, timeout=600) for command in commands]
    for process in processes:
        assert process.returncode == 0, process.stderr[-3000:]
    record = json.loads((tmp_path / "zero" / "protoalign_finetune.json").read_text())
    assert record["results"]["assignment_cache_reused"] is False
    plain, zero = model_state(tmp_path / "plain"), model_state(tmp_path / "zero")
    assert plain.keys() == zero.keys()
    for name in plain:
        assert torch.equal(plain[name], zero[name]), name
    check_quiet_console(*processes, tmp_path / "zero")


def check_quiet_console(plain: subprocess.CompletedProcess, finetune: subprocess.CompletedProcess, work_dir: Path):
    """finetune's default console: each distinct warning once (plain mace repeats them), the epochs, the model path."""
    def warning_messages(stderr: str) -> list[str]:
        return [line.split("Warning: ", 1)[1] for line in stderr.splitlines() if "Warning: " in line]

    repeated, shown = warning_messages(plain.stderr), warning_messages(finetune.stderr)
    assert len(shown) == len(set(shown)) < len(repeated)  # plain: 18 warnings, 14 of them one TorchScript warning
    assert f" INFO: Epoch {EPOCHS - 1}: head: Default, loss=" in finetune.stdout
    assert "Atomic Energies used" not in finetune.stdout
    assert "Atomic Energies used" in (work_dir / "logs" / "tiny_run-1.log").read_text()  # the log keeps everything
    last_line = finetune.stdout.splitlines()[-1]
    assert last_line.startswith(f"fine-tuning finished: fine-tuned model {work_dir / 'tiny.model'}")


def test_positive_weight_logs_the_term_and_changes_training(runs):
    lines = records(runs["aligned"])
    initial = [r for r in lines if r.get("initial")]
    assert len(initial) == 1 and initial[0]["valid"]["Default"]["align"] > 0
    logged = epoch_records(lines)
    assert [logged[e]["lambda"] for e in range(EPOCHS)] == pytest.approx([0.0, 1 / 3, 2 / 3])
    for record in logged.values():
        assert record["train"]["align"] > 0 and record["valid"]["Default"]["align"] > 0
        assert record["train"]["graphs"] == 16 and record["train"]["graphs_missing"] == 0
        assert record["valid"]["Default"]["graphs"] == 6 and record["valid"]["Default"]["graphs_missing"] == 0
    plain, aligned = model_state(runs["plain"]), model_state(runs["aligned"])
    assert any(not torch.equal(plain[name], aligned[name]) for name in plain)
    plain_metrics, aligned_metrics = metrics(runs["plain"]), metrics(runs["aligned"])
    assert aligned_metrics[1] == plain_metrics[1]  # epoch 0 has λ = 0 (warmup): identical
    assert aligned_metrics[-1] != plain_metrics[-1]
    log = next((runs["aligned"] / "logs").glob("tiny_run-1.log")).read_text()
    assert "protoalign epoch 2: lambda=0.6667 train_align=" in log


def test_verbose_shows_the_whole_console_of_mace(runs):
    quiet = (runs["zero"].parent / "zero.stdout").read_text()
    verbose = (runs["aligned"].parent / "aligned.stdout").read_text()
    assert "Atomic Energies used" in verbose and "Atomic Energies used" not in quiet
    for stdout in (quiet, verbose):
        assert f"Epoch {EPOCHS - 1}: head: Default, loss=" in stdout and "protoalign epoch 2: lambda=" in stdout


def test_overwrite_replaces_an_earlier_run(runs, tmp_path, tiny_model, molecules_xyz, prototypes_file):
    """The earlier run's files go first (without --overwrite it is refused: test_finetune_cli.py). A stale
    checkpoint of a higher epoch would otherwise be what mace's final evaluation loads and saves as the model.
    The assignment cache (named by content) is kept and reused."""
    shutil.copytree(runs["zero"] / "protoalign", tmp_path / "protoalign", ignore=shutil.ignore_patterns("*.jsonl"))
    earlier = {"checkpoints/tiny_run-1_epoch-9.pt": "not a checkpoint", "tiny.model": "an old model",
               "results/tiny_run-1_train.txt": '{"mode": "eval", "epoch": 9, "loss": 0.1}\n',
               "protoalign/align_tiny_run-1.jsonl": '{"event": "start", "start_epoch": 0}\n',
               "protoalign_finetune.json": '{"results": {"status": "finished"}}\n'}
    for name, text in earlier.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    stdout = finetune(prototypes_file, mace_args(tmp_path, tiny_model, molecules_xyz, 1), "--overwrite")
    assert stdout.splitlines()[-1].startswith(f"fine-tuning finished: fine-tuned model {tmp_path / 'tiny.model'}")
    assert not (tmp_path / "checkpoints" / "tiny_run-1_epoch-9.pt").exists()
    assert [row["epoch"] for row in metrics(tmp_path)] == [None, 0]
    assert [r.get("event") for r in records(tmp_path)].count("start") == 1
    record = json.loads((tmp_path / "protoalign_finetune.json").read_text())
    assert record["results"]["status"] == "finished" and record["results"]["model"] == str(tmp_path / "tiny.model")
    assert record["results"]["assignment_cache_reused"] is True
    assert model_state(tmp_path)  # a trained MACE model, not the earlier file


def test_run_record(runs, prototypes_file, tiny_model):
    from protoalign_cli.io.provenance import sha256_file

    record = json.loads((runs["aligned"] / "protoalign_finetune.json").read_text())
    assert record["results"]["status"] == "finished"
    assert record["inputs"]["foundation_sha256"] == sha256_file(tiny_model)
    assert record["inputs"]["prototypes_sha256"] == sha256_file(prototypes_file)
    assert record["inputs"]["settings"]["weight"] == 1.0 and record["inputs"]["settings"]["warmup_epochs"] == 3
    assert "--foundation_model" in record["inputs"]["mace_args"]
    statistics = record["results"]["assignment"]
    assert statistics["configurations"] == {"train": 24, "valid": 0}
    assert set(statistics["per_element"]) == {"H", "C", "N", "O"}
    assert all(0 < e["fraction_weighted"] <= 1 for e in statistics["per_element"].values())
    assert record["versions"]["mace-torch"] == "0.3.16"
    assert Path(record["results"]["assignment_cache"]).is_file()


def test_restart_latest_restores_the_term(runs, tmp_path, tiny_model, molecules_xyz, prototypes_file):
    """Interrupt after 2 of 3 epochs, restart with --restart_latest: λ, weights and term continue as uninterrupted."""
    options = ("--align-weight", "1", "--align-warmup-epochs", "3")
    finetune(prototypes_file, mace_args(tmp_path, tiny_model, molecules_xyz, 2), *options)
    finetune(prototypes_file, mace_args(tmp_path, tiny_model, molecules_xyz, 3, "--restart_latest"), *options)
    lines = records(tmp_path)
    starts = [i for i, r in enumerate(lines) if r.get("event") == "start"]
    assert len(starts) == 2
    resumed_at = lines[starts[1]]["start_epoch"]
    assert resumed_at >= 1
    uninterrupted = epoch_records(records(runs["aligned"]))
    restart_initial = lines[starts[1] + 1]
    assert restart_initial["initial"] and restart_initial["lambda"] == uninterrupted[resumed_at]["lambda"]
    assert restart_initial["valid"]["Default"]["align"] == pytest.approx(
        uninterrupted[resumed_at]["valid"]["Default"]["align"], rel=1e-10)
    assert restart_initial["valid"]["Default"]["weight"] == uninterrupted[resumed_at]["valid"]["Default"]["weight"]
    resumed = epoch_records(lines[starts[1]:])
    assert sorted(resumed) == list(range(resumed_at, 3))
    assert [resumed[e]["lambda"] for e in resumed] == [uninterrupted[e]["lambda"] for e in resumed]
    record = json.loads((tmp_path / "protoalign_finetune.json").read_text())
    reference = json.loads((runs["aligned"] / "protoalign_finetune.json").read_text())
    assert record["results"]["assignment_cache_reused"] is True
    assert record["results"]["assignment"] == reference["results"]["assignment"]


@pytest.fixture(scope="module")
def replay_swa_run(tmp_path_factory, tiny_model, molecules_xyz, prototypes_file) -> Path:
    """Work folder of a run with multihead replay (pt_head on the same molecules), stage two from epoch 1, float32."""
    work_dir = tmp_path_factory.mktemp("replay_swa")
    args = mace_args(work_dir, tiny_model, molecules_xyz, 2, "--multiheads_finetuning", "True",
                     "--pt_train_file", molecules_xyz, "--swa", "--start_swa", "1", "--default_dtype", "float32")
    finetune(prototypes_file, args, "--align-weight", "1")
    return work_dir


def test_multihead_replay_aligns_only_the_target_head(replay_swa_run):
    """Also float32 training: every target graph of the batches is found in the table."""
    for logged in epoch_records(records(replay_swa_run)).values():
        assert logged["train"]["align"] > 0 and logged["train"]["graphs_missing"] == 0
        assert logged["train"]["graphs"] == 18  # the 18 target configurations, not the 18 replayed ones
        assert logged["valid"]["pt_head"]["weight"] == 0 and logged["valid"]["pt_head"]["graphs"] == 0
        assert logged["valid"]["Default"]["align"] > 0 and logged["valid"]["Default"]["graphs"] == 6
    model = torch.load(replay_swa_run / "tiny.model", map_location="cpu", weights_only=False)
    assert list(model.heads) == ["pt_head", "Default"]
    assert next(model.parameters()).dtype == torch.float32


def test_swa_stage_two_keeps_the_term(replay_swa_run):
    log = next((replay_swa_run / "logs").glob("tiny_run-1.log")).read_text()
    assert "Changing loss based on Stage Two Weights" in log
    logged = epoch_records(records(replay_swa_run))
    assert logged[1]["train"]["align"] > 0  # epoch 1 trains with stage two's loss: it carries the term
    assert (replay_swa_run / "tiny_stagetwo.model").is_file()


def test_mace_yaml_config_is_understood(tmp_path, tiny_model, molecules_xyz):
    from protoalign_cli.finetune import target_files
    from protoalign_cli.mace.arguments import parse_mace_args

    config = tmp_path / "train.yaml"
    config.write_text(f"name: tiny\nfoundation_model: {tiny_model}\ntrain_file: {molecules_xyz}\n"
                      f"valid_file: {molecules_xyz}\nmax_num_epochs: 7\n")
    args = parse_mace_args(["--config", str(config), "--seed", "5"])
    assert (args.foundation_model, args.max_num_epochs, args.seed) == (str(tiny_model), 7, 5)
    expected = [("train", str(molecules_xyz)), ("valid", str(molecules_xyz))]
    assert [(f.role, f.path) for f in target_files(args)] == expected


def test_heads_dict_skips_the_replay_head(tmp_path, molecules_xyz):
    from protoalign_cli.finetune import target_files
    from protoalign_cli.mace.arguments import parse_mace_args

    heads = {"dft": {"train_file": str(molecules_xyz)}, "pt_head": {"train_file": "/nonexistent.xyz"}}
    args = parse_mace_args(["--name", "x", "--heads", repr(heads)])
    assert [(f.head, f.role) for f in target_files(args)] == [("dft", "train")]
    with pytest.raises(ProtoalignError, match="--heads must be a Python dict literal"):
        target_files(parse_mace_args(["--name", "x", "--heads", "{'dft': "]))


def test_batch_keys_match_the_precomputed_table(molecules_xyz):
    """The key of each graph of a real MACE batch (float32 and float64) is found in an index built from the file."""
    import ase.io
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable, torch_geometric
    from mace.tools.torch_tools import default_dtype

    from protoalign_cli.mace.trainer_hooks import configuration_index, configuration_key

    frames = ase.io.read(molecules_xyz, ":")
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in frames])])
    numbers = np.concatenate([a.numbers for a in frames])
    positions = np.concatenate([a.positions for a in frames])
    for dtype in ("float32", "float64"):
        index = configuration_index(numbers, positions, offsets, dtype)
        with default_dtype(dtype):
            z_table = AtomicNumberTable([1, 6, 7, 8])
            graphs = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a), z_table=z_table, cutoff=4.0)
                      for a in frames]
            batch = torch_geometric.batch.Batch.from_data_list(graphs[3:9])
        batch_numbers = np.array(z_table.zs)[batch.node_attrs.argmax(-1).numpy()]
        for g, (start, stop) in enumerate(zip(batch.ptr[:-1], batch.ptr[1:])):
            first = index.get(configuration_key(batch_numbers[start:stop], batch.positions[start:stop].numpy(), dtype))
            assert first == offsets[3 + g]
        assert index.get(configuration_key(batch_numbers[:5], batch.positions[:5].numpy() + 1e-3, dtype)) is None


def test_hdf5_target_files_are_read_through_mace(tmp_path, molecules_xyz):
    import ase.io
    import h5py
    from mace.data import config_from_atoms
    from mace.data.utils import save_configurations_as_HDF5

    from protoalign_cli.finetune import read_configurations

    frames = ase.io.read(molecules_xyz, ":")
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as handle:
        save_configurations_as_HDF5([config_from_atoms(a) for a in frames], 0, handle)
    read = read_configurations(str(path), 4.0, [1, 6, 7, 8])
    assert len(read) == len(frames)
    for original, atoms in zip(frames, read):
        assert np.array_equal(original.numbers, atoms.numbers)
        assert np.array_equal(original.positions, atoms.positions)


# --------------------------------------------------------------------------- bad input


def test_prototypes_of_another_model_are_refused(tmp_path, tiny_l1_model, molecules_xyz, prototypes_file):
    result = run_cli("finetune", "--prototypes", prototypes_file, "--",
                     *mace_args(tmp_path, tiny_l1_model, molecules_xyz))
    assert_one_line_error(result, "different model")
    assert not (tmp_path / "protoalign_finetune.json").exists()


def test_target_elements_without_prototypes(tmp_path, tiny_model, molecules_xyz):
    from tiny_models import write_molecules

    source = write_molecules(tmp_path / "no_nitrogen.xyz", n_configs=6, molecules=("CH4", "H2O", "CH3OH"))
    latents, prototypes = tmp_path / "lat.h5", tmp_path / "proto.h5"
    assert run_cli("extract", "--model", tiny_model, "--configs", source, "--out", latents).exit_code == 0
    assert run_cli("prototypes", latents, "--out", prototypes, "--k", "2").exit_code == 0
    args = mace_args(tmp_path / "run", tiny_model, molecules_xyz)
    assert_one_line_error(run_cli("finetune", "--prototypes", prototypes, "--", *args), "N have no prototypes")


def test_missing_elements_can_be_ignored(tmp_path):
    from protoalign_cli.terms.target_atoms import check_missing_elements
    from protoalign_cli.prototypes.assignment import Assignment

    distance = np.array([0.5, np.inf, np.inf, 1.0])
    assignment = Assignment(np.array([1, 7, 7, 6]), np.array([0, -1, -1, 3]), distance, distance)
    assert check_missing_elements(assignment, "ignore") == ["N"]


def test_missing_foundation_model(tmp_path, molecules_xyz, prototypes_file):
    args = [a for a in mace_args(tmp_path, Path("x"), molecules_xyz) if a not in ("--foundation_model", "x")]
    assert_one_line_error(run_cli("finetune", "--prototypes", prototypes_file, "--", *args), "--foundation_model")


def test_unknown_mace_option(tmp_path, tiny_model, molecules_xyz, prototypes_file):
    args = mace_args(tmp_path, tiny_model, molecules_xyz, EPOCHS, "--no_such_option", "3")
    assert_one_line_error(run_cli("finetune", "--prototypes", prototypes_file, "--", *args),
                          "unknown mace_run_train option(s): --no_such_option 3")


@pytest.mark.parametrize("option, value, pattern", [
    ("--align-weight", "-0.1", "--align-weight must be a finite number >= 0"),
    ("--align-cutoff", "0", "--align-cutoff must be > 0"),
    ("--align-decay-epochs", "0", "--align-decay-epochs must be >= 1"),
    ("--align-spread-scale", "-1", "--align-spread-scale must be > 0"),
])
def test_bad_settings(option, value, pattern, tmp_path, tiny_model, molecules_xyz, prototypes_file):
    args = mace_args(tmp_path, tiny_model, molecules_xyz)
    assert_one_line_error(run_cli("finetune", "--prototypes", prototypes_file, option, value, "--", *args), pattern)


def test_negative_weight_from_the_shell(tmp_path, prototypes_file):
    """``python -m protoalign_cli.cli`` (the torchrun entry): a one-line error and exit status 1."""
    process = subprocess.run(
        [sys.executable, "-m", "protoalign_cli.cli", "finetune", "--prototypes", str(prototypes_file),
         "--align-weight", "-1", "--", "--name", "x"], capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == ["Error: --align-weight must be a finite number >= 0, got -1.0"]


@pytest.mark.parametrize("launcher, environ, expected", [
    ("torchrun", {"RANK": "3", "LOCAL_RANK": "1"}, (3, 1)),
    ("slurm", {"SLURM_PROCID": "5", "SLURM_LOCALID": "2"}, (5, 2)),
    ("mpi", {"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (4, 0)),
])
def test_each_rank_knows_its_gpu_before_mace_starts(launcher, environ, expected, monkeypatch):
    from protoalign_cli.finetune import precompute_device
    from protoalign_cli.mace.arguments import launch_rank, parse_mace_args

    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = parse_mace_args(["--name", "x", "--distributed", "--launcher", launcher, "--device", "cuda"])
    assert launch_rank(args) == expected
    assert precompute_device(args) == f"cuda:{expected[1]}"
    assert launch_rank(parse_mace_args(["--name", "x"])) == (0, 0)


def test_prototypes_of_another_head_are_refused(tmp_path, tiny_two_head_model, molecules_xyz):
    latents, prototypes = tmp_path / "lat.h5", tmp_path / "proto.h5"
    assert run_cli("extract", "--model", tiny_two_head_model, "--configs", molecules_xyz, "--out", latents,
                   "--head", "dft").exit_code == 0
    assert run_cli("prototypes", latents, "--out", prototypes, "--k", "2").exit_code == 0
    args = mace_args(tmp_path / "run", tiny_two_head_model, molecules_xyz, EPOCHS, "--foundation_head", "cc")
    result = run_cli("finetune", "--prototypes", prototypes, "--", *args)
    assert_one_line_error(result, "prototypes describe head 'dft'")


def test_a_failing_mace_run_is_one_line_and_recorded(tmp_path, tiny_model, molecules_xyz, prototypes_file):
    args = [a if a != "foundation" else "{1: -13.6}" for a in mace_args(tmp_path, tiny_model, molecules_xyz)]
    result = run_cli("finetune", "--prototypes", prototypes_file, "--", *args)
    assert_one_line_error(result, "mace_run_train failed: KeyError")
    record = json.loads((tmp_path / "protoalign_finetune.json").read_text())
    assert record["results"]["status"].startswith("failed: KeyError")
    assert "Traceback" in (tmp_path / "logs" / "tiny_run-1_debug.log").read_text()


@pytest.mark.parametrize("owner, name, missing", [
    ("mace.cli.run_train", "get_loss_fn", "mace.cli.run_train.get_loss_fn"),
    ("mace.tools.train", "evaluate", "mace.tools.train.evaluate"),
])
def test_a_mace_without_a_hooked_name_stops_before_training(owner, name, missing, monkeypatch, tmp_path, tiny_model,
                                                             molecules_xyz, prototypes_file):
    import importlib

    monkeypatch.delattr(importlib.import_module(owner), name)
    result = run_cli("finetune", "--prototypes", prototypes_file, "--", *mace_args(tmp_path, tiny_model, molecules_xyz))
    assert_one_line_error(result, f"lacks {missing},", "mace-torch 0.3.16")
    assert not any(tmp_path.iterdir())  # nothing ran: no record, no assignment, no MACE output


def test_a_renamed_mace_argument_stops_before_training(monkeypatch, tmp_path, tiny_model, molecules_xyz,
                                                        prototypes_file):
    train_module = sys.modules["mace.tools.train"]
    original = train_module.train_one_epoch

    def renamed(model, loss_fn, data_loader, optimizer, epoch_index, *args, **kwargs):
        return original(model, loss_fn, data_loader, optimizer, epoch_index, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", renamed)
    result = run_cli("finetune", "--prototypes", prototypes_file, "--", *mace_args(tmp_path, tiny_model, molecules_xyz))
    assert_one_line_error(result, "argument 'epoch' of mace.tools.train.train_one_epoch", "mace-torch 0.3.16")
    assert not any(tmp_path.iterdir())


def test_batch_size_below_one_is_refused(tmp_path, tiny_model, molecules_xyz, prototypes_file):
    args = mace_args(tmp_path, tiny_model, molecules_xyz)
    result = run_cli("finetune", "--prototypes", prototypes_file, "--batch-size", "0", "--", *args)
    assert_one_line_error(result, "--batch-size must be >= 1")
    assert not any(tmp_path.iterdir())


def test_mace_is_left_as_it_was(runs):
    """After the runs (the fixture made three), MACE's names are the originals again."""
    import mace.tools
    from mace.cli import run_train
    from mace.tools import model_script_utils, scripts_utils

    train_module = sys.modules["mace.tools.train"]
    assert run_train.get_loss_fn is scripts_utils.get_loss_fn
    assert run_train.get_swa is scripts_utils.get_swa
    assert run_train.configure_model is model_script_utils.configure_model
    assert mace.tools.train is train_module.train
    assert train_module.train_one_epoch.__module__ == train_module.evaluate.__module__ == "mace.tools.train"
