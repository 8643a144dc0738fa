"""Model loading (paths, foundation names from mace's cache), checkpoint errors, latent layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error

from protoalign_cli.cli import main
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.mace.models import describe_model, load_model, resolve_model_path, scalar_slices
from protoalign_cli.io.provenance import sha256_file
from protoalign_cli.io.schema import read_latents

# The cache file names mace-torch 0.3.16 looks for: download_mace_mp_checkpoint keeps the alphanumeric
# and '_' characters of the URL's basename (.../2023-12-10-mace-128-L0_energy_epoch-249.model);
# mace_off keeps the basename (.../MACE-OFF23_small.model).
FOUNDATION_CACHE_NAMES = {
    "small": "20231210mace128L0_energy_epoch249model",
    "small_off": "MACE-OFF23_small.model",
}


def test_a_checkpoint_path_resolves_to_itself(tiny_model):
    assert resolve_model_path(str(tiny_model)) == Path(tiny_model)


def test_a_folder_or_an_unknown_name_is_refused(tmp_path):
    with pytest.raises(ProtoalignError, match="is not a file"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ProtoalignError, match="neither an existing file nor a MACE foundation name"):
        resolve_model_path("no_such_model")


def test_a_missing_model_file_is_refused_without_importing_mace():
    import subprocess
    import sys

    code = ("import sys\nfrom protoalign_cli.mace.models import resolve_model_path\n"
            "try:\n    resolve_model_path('runs/absent.model')\nexcept Exception as exc:\n    print(exc)\n"
            "print('mace' in sys.modules)")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["model file runs/absent.model does not exist", "False"]


@pytest.mark.parametrize("name", sorted(FOUNDATION_CACHE_NAMES))
def test_foundation_name_is_found_in_the_mace_cache_offline(name, tiny_model, molecules_xyz, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "mace").mkdir(parents=True)
    shutil.copy(tiny_model, cache / "mace" / FOUNDATION_CACHE_NAMES[name])
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    out = tmp_path / "latents.h5"
    result = CliRunner().invoke(main, ["extract", "--model", name, "--configs", str(molecules_xyz), "--out", str(out),
                                       "--max-configs", "3"])
    assert result.exit_code == 0, result.output
    header = read_latents(out).header
    assert header.model_path == str(cache / "mace" / FOUNDATION_CACHE_NAMES[name])
    assert header.model_sha256 == sha256_file(tiny_model)
    assert "Downloading" not in result.stdout


def test_unknown_model_name_is_a_clear_cli_error(molecules_xyz, tmp_path):
    result = CliRunner().invoke(main, ["extract", "--model", "huge_off", "--configs", str(molecules_xyz),
                                       "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: model 'huge_off' is neither an existing file nor a MACE foundation name")
    assert "small_off" in result.stderr and "medium" in result.stderr


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "not a model", "empty"])
def test_bad_checkpoints_are_refused(kind, tiny_model, tmp_path):
    import torch

    path = tmp_path / "bad.model"
    if kind == "random bytes":
        path.write_bytes(os.urandom(20000))
    elif kind == "truncated":
        data = Path(tiny_model).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not a model":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(ProtoalignError, match="cannot load MACE checkpoint|is not a MACE model checkpoint"):
        load_model(path)


@pytest.mark.parametrize("first_byte", [b"P", b"Q"])
def test_a_multi_line_load_error_becomes_one_line(first_byte, tmp_path, molecules_xyz):
    """torch's UnpicklingError for a pickle opening with a persistent-id opcode spans two lines."""
    path = tmp_path / "bad.model"
    path.write_bytes(first_byte + os.urandom(2000))
    with pytest.raises(ProtoalignError, match="cannot load MACE checkpoint") as caught:
        load_model(path)
    assert "\n" not in str(caught.value)
    result = CliRunner().invoke(main, ["extract", "--model", str(path), "--configs", str(molecules_xyz),
                                       "--out", str(tmp_path / "latents.h5")])
    assert_one_line_error(result, "cannot load MACE checkpoint", "UnpicklingError")


def test_cuda_without_cuda_is_refused(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ProtoalignError, match="CUDA is not available"):
        load_model(tiny_model, device="cuda")


def test_loaded_model_is_frozen_in_the_asked_dtype(tiny_model):
    import torch

    model = load_model(tiny_model, dtype="float32")
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_scalar_slices_keep_only_0e_features(tiny_model, tiny_l1_model):
    assert scalar_slices(load_model(tiny_model)) == [[(0, 8)], [(8, 16)]]
    # 8x0e+8x1o after the first block (32 columns), 8x0e after the last
    assert scalar_slices(load_model(tiny_l1_model)) == [[(0, 8)], [(32, 40)]]


@pytest.mark.parametrize(
    "fixture, names, heads, scales, shifts",
    [
        ("tiny_model", ["interaction_0", "interaction_1", "readout_0", "readout_1"], ("Default",), (0.9,), (0.07,)),
        ("tiny_l1_model", ["interaction_0", "interaction_1", "readout_0", "readout_1"], ("Default",), (0.9,), (0.07,)),
        ("tiny_two_head_model", ["interaction_0", "interaction_1", "readout_0", "readout_1"], ("dft", "cc"),
         (0.8, 1.1), (0.05, 0.1)),
        ("tiny_plain_model", ["interaction_0", "interaction_1", "pair_repulsion", "readout_0", "readout_1"],
         ("Default",), (1.0,), (0.0,)),
    ],
)
def test_describe_model(request, fixture, names, heads, scales, shifts):
    path = request.getfixturevalue(fixture)
    info = describe_model(load_model(path), path)
    assert [block.name for block in info.layout] == names
    assert [block.size for block in info.layout] == [8, 8] + [1] * (len(names) - 2)
    assert [block.start for block in info.layout] == list(np.cumsum([0] + [b.size for b in info.layout[:-1]]))
    assert info.latent_dim == 16 + len(names) - 2
    assert info.heads == heads
    assert info.atomic_numbers == (1, 6, 7, 8)
    assert info.r_max == 4.0
    assert info.has_pair_repulsion == ("pair_repulsion" in names)
    np.testing.assert_allclose(info.scales, scales, atol=1e-7)
    np.testing.assert_allclose(info.shifts, shifts, atol=1e-7)
    assert info.e0s.shape == (len(heads), 4)
    assert info.e0_by_head()[heads[-1]][8] == pytest.approx(-2041.8 + 0.1 * (len(heads) - 1), abs=1e-4)
    assert info.sha256 == sha256_file(path)


def test_default_dtype_is_restored_even_when_the_block_fails():
    import torch

    from protoalign_cli.mace.models import default_dtype

    before = torch.get_default_dtype()
    with pytest.raises(KeyboardInterrupt):
        with default_dtype("float64" if before == torch.float32 else "float32"):
            assert torch.get_default_dtype() != before
            raise KeyboardInterrupt
    assert torch.get_default_dtype() == before
