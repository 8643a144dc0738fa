"""protoalign extract / merge-latents on the command line: success paths and every kind of bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoalign_cli.cli import main
from protoalign_cli.io.outputs import partial_path
from protoalign_cli.io.schema import read_latents


def run_cli(*args):
    """Invoke ``protoalign`` in-process; return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result_or_stderr, exit_code, out: Path, pattern: str) -> None:
    """The command failed with exactly one 'Error: ...' line on stderr, no traceback, no output, no .partial."""
    if isinstance(result_or_stderr, str):
        stderr = result_or_stderr
    else:
        assert isinstance(result_or_stderr.exception, SystemExit), result_or_stderr.exception
        stderr = result_or_stderr.stderr
    assert exit_code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert pattern in lines[0], lines[0]
    assert not partial_path(out).exists()


@pytest.fixture()
def garbage_files(tmp_path):
    """Unreadable structure files: random bytes, text that is not a structure, an empty file, an unknown format."""
    files = {
        "random bytes": tmp_path / "random.xyz",
        "text": tmp_path / "text.xyz",
        "empty": tmp_path / "empty.xyz",
        "unknown format": tmp_path / "notes.foo",
        "truncated": tmp_path / "truncated.xyz",
    }
    files["random bytes"].write_bytes(os.urandom(5000))
    files["text"].write_text("hello\nthis is not a structure file\n")
    files["empty"].write_text("")
    files["unknown format"].write_text("some notes\n")
    files["truncated"].write_text("5\nProperties=species:S:1:pos:R:3\nC 0 0 0\nH 1 0 0\n")
    return files


@pytest.mark.parametrize("kind", ["random bytes", "text", "empty", "unknown format", "truncated"])
def test_unreadable_structure_file(kind, garbage_files, tiny_model, tmp_path):
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", garbage_files[kind], "--out", out)
    assert_one_line_error(result, result.exit_code, out, str(garbage_files[kind]))
    assert not out.exists()


def test_missing_structure_file(tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--configs", tmp_path / "nope.xyz",
                     "--out", out)
    assert_one_line_error(result, result.exit_code, out, "nope.xyz does not exist")
    assert not out.exists()


@pytest.mark.parametrize("shard, pattern", [("3/3", "--shard 3/3"), ("x/y", "--shard must look like I/N"),
                                            ("1", "--shard must look like I/N"), ("0/0", "--shard 0/0")])
def test_bad_shard(shard, pattern, tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", out, "--shard", shard)
    assert_one_line_error(result, result.exit_code, out, pattern)
    assert not out.exists()


def test_shard_selecting_nothing(tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", out,
                     "--shard", "5/8", "--max-configs", "4")
    assert_one_line_error(result, result.exit_code, out, "selects no configuration")


def test_existing_output_is_left_untouched(tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    out.write_bytes(b"precious")
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", out)
    assert_one_line_error(result, result.exit_code, out, "exists; pass --overwrite")
    assert out.read_bytes() == b"precious"


def test_failed_overwrite_leaves_the_old_output(tiny_model, tmp_path, garbage_files):
    out = tmp_path / "latents.h5"
    out.write_bytes(b"precious")
    result = run_cli("extract", "--model", tiny_model, "--configs", garbage_files["text"], "--out", out, "--overwrite")
    assert_one_line_error(result, result.exit_code, out, "cannot read structures")
    assert out.read_bytes() == b"precious"


def test_missing_output_folder(tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "no" / "latents.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", out)
    assert_one_line_error(result, result.exit_code, out, "does not exist")


@pytest.mark.parametrize("kind", ["random bytes", "truncated"])
def test_corrupt_checkpoint(kind, tiny_model, molecules_xyz, tmp_path):
    model = tmp_path / "bad.model"
    data = Path(tiny_model).read_bytes()
    model.write_bytes(os.urandom(len(data)) if kind == "random bytes" else data[: len(data) // 3])
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", model, "--configs", molecules_xyz, "--out", out)
    assert_one_line_error(result, result.exit_code, out, f"cannot load MACE checkpoint {model}")
    assert not out.exists()


def test_unknown_head(tiny_two_head_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", tiny_two_head_model, "--configs", molecules_xyz, "--out", out, "--head", "pbe")
    assert_one_line_error(result, result.exit_code, out, "--head 'pbe' is not one of the model's heads: dft, cc")
    assert not out.exists()


def test_bad_numbers(tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    for option in ("--batch-size", "--max-configs"):
        result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", out, option, "0")
        assert_one_line_error(result, result.exit_code, out, f"{option} must be >= 1")


def protoalign_subprocess(*args, cwd=None):
    """Run the real ``protoalign`` entry point in a fresh interpreter; return (exit code, stdout, stderr)."""
    code = "import sys; from protoalign_cli.cli import main; sys.argv[0] = 'protoalign'; main()"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_element_not_in_the_model_in_a_subprocess(tiny_model, molecules_xyz, tmp_path):
    import ase.io
    from ase.build import bulk

    silicon = tmp_path / "si.xyz"
    frames = ase.io.read(molecules_xyz, index=":3") + [bulk("Si", "diamond", a=5.43)]
    ase.io.write(silicon, frames, format="extxyz")
    out = tmp_path / "latents.h5"
    code, stdout, stderr = protoalign_subprocess("extract", "--model", tiny_model, "--configs", silicon, "--out", out)
    assert code == 1
    assert_one_line_error(stderr, code, out, f"{silicon}, configuration 3: element(s) Si not in the model")
    assert stdout == ""
    assert not out.exists()


def test_extract_shards_and_merge_on_the_command_line(tiny_model, molecules_xyz, tmp_path):
    whole = tmp_path / "whole.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", whole, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {read_latents(whole).n_atoms} atoms of 24 configurations to {whole}"
    shards = []
    for index in range(3):
        shard = tmp_path / f"shard{index}.h5"
        result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", shard,
                         "--shard", f"{index}/3", "--batch-size", "1")
        assert result.exit_code == 0, result.output
        shards.append(shard)
    merged = tmp_path / "merged.h5"
    result = run_cli("merge-latents", *shards, "--out", merged)
    assert result.exit_code == 0, result.output
    a, b = read_latents(whole), read_latents(merged)
    order_a = np.lexsort((a.atom_index, a.config_index))
    order_b = np.lexsort((b.atom_index, b.config_index))
    np.testing.assert_array_equal(a.latent[order_a], b.latent[order_b])
    np.testing.assert_array_equal(a.node_energy[order_a], b.node_energy[order_b])
    result = run_cli("merge-latents", *shards, "--out", merged)
    assert_one_line_error(result, result.exit_code, merged, "exists; pass --overwrite")
    result = run_cli("merge-latents", shards[0], tmp_path / "missing.h5", "--out", tmp_path / "m2.h5")
    assert_one_line_error(result, result.exit_code, tmp_path / "m2.h5", "missing.h5 does not exist")
    (tmp_path / "junk.h5").write_bytes(os.urandom(3000))
    result = run_cli("merge-latents", shards[0], tmp_path / "junk.h5", "--out", tmp_path / "m3.h5")
    assert_one_line_error(result, result.exit_code, tmp_path / "m3.h5", "cannot open latent file")
    assert not (tmp_path / "m2.h5").exists() and not (tmp_path / "m3.h5").exists()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_bundled_example_extracts(tmp_path):
    """The quickstart's first step on the committed example (examples/make_example.py made it)."""
    sizes = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert sizes < 2 * 1024 * 1024
    out = tmp_path / "source_latents.h5"
    result = run_cli("extract", "--model", EXAMPLES / "foundation.model", "--configs", EXAMPLES / "data" / "source.xyz",
                     "--out", out)
    assert result.exit_code == 0, result.output
    latents = read_latents(out)
    assert latents.header.model_type == "ScaleShiftMACE"
    assert latents.header.n_configs_selected == 240
    assert set(np.unique(latents.atomic_number)) == {1, 6, 7, 8}
    e0 = latents.header.e0_of(latents.atomic_number)
    energy = latents.latent[:, latents.header.columns(("energy",))].sum(axis=1)
    np.testing.assert_allclose(e0 + energy + latents.header.head_shift(), latents.node_energy, rtol=0, atol=1e-10)


def test_progress_reaches_a_log_file_as_plain_lines(tiny_model, molecules_xyz, tmp_path, monkeypatch):
    """With stderr not a terminal (SLURM logs, a pipe) the progress is a line per update, not a tqdm bar."""
    from protoalign_cli import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)  # a line per batch
    out = tmp_path / "latents.h5"
    result = run_cli("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", out, "--batch-size", "8")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("extract: ")]
    assert [line.split(" configs")[0] for line in lines] == ["extract: 8/24", "extract: 16/24", "extract: 24/24",
                                                             "extract: 24/24"], result.stderr
