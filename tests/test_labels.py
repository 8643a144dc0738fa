"""Labels of target data: NaN/inf refused before any work, missing label keys named with the keys a file has,
unknown elements named by file and symbol, empty files worded alike (finetune, diagnose, bench)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error, assert_untouched, snapshot
from protoalign_cli.cli import main
from protoalign_cli.errors import ProtoalignError
from tiny_models import write_molecules


def run_cli(*args):
    """Invoke ``protoalign`` in-process; return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def spoiled(path: Path, frame: int, change) -> Path:
    """Six labelled molecules written to ``path`` (extxyz) after ``change(atoms)`` on configuration ``frame``."""
    import ase.io

    frames = ase.io.read(write_molecules(path, n_configs=6, seed=4), ":")
    change(frames[frame])
    ase.io.write(path, frames, format="extxyz")
    return path


def set_info(key, value):
    return lambda atoms: atoms.info.__setitem__(key, value)


def set_array(key, row, value):
    def change(atoms):
        atoms.arrays[key][row, 0] = value
    return change


def drop_keys(*keys):
    def change(atoms):
        for key in keys:
            atoms.info.pop(key, None)
            atoms.arrays.pop(key, None)
    return change


SPOILERS = {
    "nan energy": (set_info("REF_energy", np.nan), "REF_energy"),
    "inf energy": (set_info("REF_energy", np.inf), "REF_energy"),
    "nan force": (set_array("REF_forces", 1, np.nan), "REF_forces"),
    "inf position": (set_array("positions", 0, -np.inf), "positions"),
}


# --------------------------------------------------------------------------- pure functions


def test_non_finite_fields_names_only_numeric_values_that_are_not_finite():
    from protoalign_cli.io.structures import non_finite_fields

    values = {"positions": np.zeros((2, 3)), "REF_energy": np.nan, "REF_forces": np.array([[0.0, np.inf, 1.0]]),
              "config_type": "bulk", "absent": None, "count": np.arange(3), "weight": 1.0}
    assert non_finite_fields(values) == ["REF_energy", "REF_forces"]
    assert non_finite_fields({"positions": np.ones((3, 3))}) == []


def test_labels_are_found_in_info_arrays_and_calculator_results(tmp_path):
    import ase.io
    from protoalign_cli.io.structures import label, label_keys

    path = tmp_path / "calc.xyz"
    path.write_text('1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.5 REF_energy=-2.0 config_type=x\n'
                    'H 0 0 0 0.1 0 0\n')
    atoms = ase.io.read(path)
    assert label(atoms, "energy") == -1.5 and label(atoms, "REF_energy") == -2.0
    np.testing.assert_array_equal(label(atoms, "forces"), [[0.1, 0, 0]])
    assert label(atoms, "REF_forces") is None
    assert label_keys([atoms]) == ["REF_energy", "config_type", "energy", "forces"]


def test_element_errors_name_the_file_the_configuration_and_the_symbol(tmp_path):
    from protoalign_cli.finetune import TargetFile, labelled_configurations

    path = spoiled(tmp_path / "sulfur.xyz", 3, lambda atoms: atoms.numbers.__setitem__(0, 16))
    info = SimpleNamespace(r_max=4.0, atomic_numbers=[1, 6, 7, 8])
    with pytest.raises(ProtoalignError, match=f"{path}, configuration 3: element\\(s\\) S not in the model"):
        list(labelled_configurations([TargetFile("Default", "train", str(path))], info))


# --------------------------------------------------------------------------- finetune


def finetune_error(tmp_path, prototypes_file, tiny_model, molecules_xyz, *files, keys=()):
    """Run finetune on a fresh work dir with the given mace file options; the work dir must stay empty."""
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    before = snapshot(tmp_path)
    result = run_cli("finetune", "--prototypes", prototypes_file, "--", "--name", "tiny", "--work_dir", work_dir,
                     "--foundation_model", tiny_model, "--E0s", "foundation", "--max_num_epochs", "1",
                     "--default_dtype", "float64", "--device", "cpu", *keys, *files)
    assert_untouched(tmp_path, before)
    return result


@pytest.mark.parametrize("spoiler", SPOILERS)
@pytest.mark.parametrize("role", ["train", "valid", "test"])
def test_finetune_refuses_non_finite_data_before_training(role, spoiler, tmp_path, prototypes_file, tiny_model,
                                                          molecules_xyz):
    change, field = SPOILERS[spoiler]
    bad = spoiled(tmp_path / f"{role}.xyz", 4, change)
    files = {"train": molecules_xyz, "valid": molecules_xyz, "test": molecules_xyz, role: bad}
    result = finetune_error(tmp_path, prototypes_file, tiny_model, molecules_xyz,
                            *(item for r, f in files.items() for item in (f"--{r}_file", f)))
    assert_one_line_error(result, f"{bad}, configuration 4: non-finite {field}")


@pytest.mark.parametrize("keys, missing", [
    ((), "energy key 'REF_energy'"),
    (("--energy_key", "REF_E"), "energy key 'REF_E'"),
    (("--forces_key", "F"), "forces key 'F'"),
])
def test_finetune_names_a_missing_label_key_and_the_keys_there(keys, missing, tmp_path, prototypes_file, tiny_model,
                                                               molecules_xyz):
    import ase.io

    frames = ase.io.read(molecules_xyz, ":")
    for atoms in frames:
        if not keys:
            atoms.info["DFT_energy"] = atoms.info.pop("REF_energy")
    train = tmp_path / "train.xyz"
    ase.io.write(train, frames, format="extxyz")
    result = finetune_error(tmp_path, prototypes_file, tiny_model, molecules_xyz, "--train_file", train, keys=keys)
    present = "DFT_energy, REF_forces" if not keys else "REF_energy, REF_forces"
    assert_one_line_error(result, f"train file {train} has no {missing}", f"keys: {present}")


def test_finetune_label_keys_follow_each_head_and_forces_weight_zero_needs_no_forces(tmp_path):
    from protoalign_cli.finetune import target_files
    from protoalign_cli.mace.arguments import parse_mace_args

    import ase.io

    energy_only = write_molecules(tmp_path / "energy_only.xyz", n_configs=4)
    frames = ase.io.read(energy_only, ":")
    for atoms in frames:
        atoms.info["DFT_energy"] = atoms.info.pop("REF_energy")
        del atoms.arrays["REF_forces"]
    ase.io.write(energy_only, frames, format="extxyz")
    heads = {"dft": {"train_file": str(energy_only), "energy_key": "DFT_energy"}}
    args = parse_mace_args(["--name", "x", "--heads", repr(heads), "--forces_weight", "0"])
    assert [(f.head, f.role) for f in target_files(args)] == [("dft", "train")]
    with pytest.raises(ProtoalignError, match="has no forces key 'REF_forces' in any configuration \\(keys: DFT_energy"):
        target_files(parse_mace_args(["--name", "x", "--heads", repr(heads)]))
    with pytest.raises(ProtoalignError, match="has no energy key 'REF_energy'"):
        target_files(parse_mace_args(["--name", "x", "--train_file", str(energy_only), "--forces_weight", "0"]))


def test_finetune_reads_empty_files_with_the_common_wording(tmp_path, prototypes_file, tiny_model, molecules_xyz):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    result = finetune_error(tmp_path, prototypes_file, tiny_model, molecules_xyz, "--train_file", molecules_xyz,
                            "--valid_file", empty)
    assert_one_line_error(result, f"valid file {empty} holds no configurations")


def test_finetune_checks_mace_hdf5_data_for_non_finite_values(tmp_path, molecules_xyz):
    import ase.io
    import h5py
    from mace.data import KeySpecification, config_from_atoms
    from mace.data.utils import save_configurations_as_HDF5

    from protoalign_cli.finetune import read_configurations

    frames = ase.io.read(molecules_xyz, ":")
    frames[5].info["REF_energy"] = np.nan
    keys = KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as handle:
        save_configurations_as_HDF5([config_from_atoms(a, keys) for a in frames], 0, handle)
    with pytest.raises(ProtoalignError, match=f"{path}, configuration 5: non-finite energy"):
        read_configurations(str(path), 4.0, [1, 6, 7, 8])


# --------------------------------------------------------------------------- bench, diagnose


@pytest.mark.parametrize("spoiler", SPOILERS)
def test_bench_refuses_non_finite_target_data(spoiler, tmp_path):
    from protoalign_cli.bench.data import read_target_frames

    change, field = SPOILERS[spoiler]
    bad = spoiled(tmp_path / "target.xyz", 5, change)
    config = SimpleNamespace(split=SimpleNamespace(pool=(0, 2), valid=(2, 4), test=(4, 6)), target_files=[bad],
                             energy_key="REF_energy", forces_key="REF_forces")
    with pytest.raises(ProtoalignError, match=f"{bad}, configuration 5: non-finite {field}"):
        read_target_frames(config)


def test_bench_names_the_keys_of_a_target_without_labels(tmp_path):
    from protoalign_cli.bench.data import read_target_frames

    bad = spoiled(tmp_path / "target.xyz", 1, drop_keys("REF_energy"))
    config = SimpleNamespace(split=SimpleNamespace(pool=(0, 2), valid=(2, 4), test=(4, 6)), target_files=[bad],
                             energy_key="REF_energy", forces_key="REF_forces")
    with pytest.raises(ProtoalignError, match=f"{bad}, configuration 1: no energy label 'REF_energy'.*keys: REF_forces"):
        read_target_frames(config)


@pytest.mark.parametrize("spoiler", ["inf position", "empty"])
def test_diagnose_refuses_bad_positions_and_empty_files_before_any_report(spoiler, tmp_path, prototypes_file):
    if spoiler == "empty":
        bad = tmp_path / "target.xyz"
        bad.write_text("")
        expected = f"structure file {bad} holds no configurations"
    else:
        bad = spoiled(tmp_path / "target.xyz", 2, SPOILERS[spoiler][0])
        expected = f"{bad}, configuration 2: non-finite positions"
    before = snapshot(tmp_path)
    result = run_cli("diagnose", "--prototypes", prototypes_file, "--configs", bad, "--out", tmp_path / "report")
    assert_one_line_error(result, expected)
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("spoiler", ["nan energy", "inf energy", "nan force"])
def test_diagnose_refuses_non_finite_energies_and_forces_before_any_report(spoiler, tmp_path, prototypes_file):
    change, field = SPOILERS[spoiler]
    bad = spoiled(tmp_path / "target.xyz", 2, change)
    before = snapshot(tmp_path)
    result = run_cli("diagnose", "--prototypes", prototypes_file, "--configs", bad, "--out", tmp_path / "report")
    assert_one_line_error(result, f"{bad}, configuration 2: non-finite {field}")
    assert_untouched(tmp_path, before)


def test_diagnose_lists_the_keys_of_the_target_for_a_mistyped_energy_key(tmp_path, prototypes_file):
    target = write_molecules(tmp_path / "target.xyz", n_configs=6)
    result = run_cli("diagnose", "--prototypes", prototypes_file, "--configs", target, "--energy-key", "REF_enegry",
                     "--out", tmp_path / "report")
    assert_one_line_error(result, "energy key 'REF_enegry'", "keys: REF_energy, REF_forces")


def test_diagnose_words_a_blank_target_file_like_the_other_commands(tmp_path, prototypes_file):
    blank = tmp_path / "blank.xyz"
    blank.write_text("\n\n")
    result = run_cli("diagnose", "--prototypes", prototypes_file, "--configs", blank, "--out", tmp_path / "report")
    assert_one_line_error(result, f"structure file {blank} holds no configurations")
