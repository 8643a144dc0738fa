"""Structure scanning and shard selection: the quick (ext)xyz scan must agree with ASE's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.structures import (
    NotPlainXyz,
    _xyz_species,
    iter_selected,
    parse_shard,
    scan_structures,
    selected_indices,
)
from tiny_models import write_molecules

HCNO = {1, 6, 7, 8}


def ase_numbers(path):
    import ase.io

    return [[int(z) for z in atoms.numbers] for atoms in ase.io.iread(path, index=":")]


def test_quick_scan_agrees_with_ase_on_extxyz(molecules_xyz):
    assert list(_xyz_species(Path(molecules_xyz))) == ase_numbers(molecules_xyz)
    assert scan_structures(molecules_xyz, HCNO) == 24


def test_quick_scan_follows_the_properties_column_order_and_vec_lines(tmp_path):
    odd = tmp_path / "odd.xyz"
    odd.write_text(
        '2\nProperties="pos:R:3:forces:R:3:species:S:1" energy=1.0\n'
        "0 0 0 0 0 0 O\n1 0 0 0 0 0 H\n"
        "1\nProperties=pos:R:3:species:S:1\n0 0 0 N\n"
        "1\nplain xyz comment\nC 0 0 0\n"
    )
    assert list(_xyz_species(odd)) == ase_numbers(odd) == [[8, 1], [7], [6]]
    periodic = tmp_path / "periodic.xyz"  # plain xyz with the cell as VEC lines after the atoms
    periodic.write_text(
        "2\ncomment\nC 0 0 0\nC 0.9 0.9 0.9\nVEC1 3.6 0 0\nVEC2 0 3.6 0\nVEC3 0 0 3.6\n"
        "1\ncomment\nH 0 0 0\nVEC1 3 0 0\n"
    )
    assert list(_xyz_species(periodic)) == ase_numbers(periodic) == [[6, 6], [1]]


def test_other_formats_are_scanned_by_ase(tmp_path):
    import ase.io

    frames = ase.io.read(write_molecules(tmp_path / "m.xyz", n_configs=5), index=":")
    traj = tmp_path / "m.traj"
    ase.io.write(traj, frames)
    assert scan_structures(traj, HCNO) == 5
    with pytest.raises(ProtoalignError, match="m.traj, configuration 1: element\\(s\\) O not in the model"):
        scan_structures(traj, {1, 6})


def test_quick_scan_hands_odd_files_to_ase(tmp_path):
    no_species = tmp_path / "z.xyz"
    no_species.write_text("1\nProperties=Z:I:1:pos:R:3\n6 0 0 0\n")
    with pytest.raises(NotPlainXyz):
        list(_xyz_species(no_species))
    truncated = tmp_path / "t.xyz"
    truncated.write_text("3\ncomment\nC 0 0 0\n")
    with pytest.raises(NotPlainXyz):
        list(_xyz_species(truncated))
    with pytest.raises(ProtoalignError, match="cannot read structures from"):
        scan_structures(truncated, HCNO)


def test_selected_indices():
    assert list(selected_indices(10, (0, 1), None)) == list(range(10))
    assert list(selected_indices(10, (1, 3), None)) == [1, 4, 7]
    assert list(selected_indices(10, (1, 3), 5)) == [1, 4]
    assert list(selected_indices(10, (2, 3), 2)) == []
    shards = [set(selected_indices(31, (i, 4), 29)) for i in range(4)]
    assert set().union(*shards) == set(range(29)) and sum(map(len, shards)) == 29


@pytest.mark.parametrize("text, expected", [(None, (0, 1)), ("0/1", (0, 1)), ("2/3", (2, 3))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


def test_iter_selected_reads_the_selected_frames_of_each_file(tmp_path):
    import ase.io

    first = write_molecules(tmp_path / "a.xyz", n_configs=7, seed=1)
    second = write_molecules(tmp_path / "b.xyz", n_configs=5, seed=2)
    frames = ase.io.read(first, index=":") + ase.io.read(second, index=":")
    selection = selected_indices(12, (2, 3), 11)  # 2, 5, 8
    for todo in (selection, selection[1:], selection[3:]):
        got = list(iter_selected([first, second], [7, 5], todo))
        assert [(f, c) for f, c, _ in got] == [(g // 7, g % 7) for g in todo]
        for g, (_, _, atoms) in zip(todo, got):
            np.testing.assert_array_equal(atoms.positions, frames[g].positions)
    with pytest.raises(ProtoalignError, match="fewer configurations than counted"):
        list(iter_selected([first], [9], selected_indices(9, (0, 1), None)))


def test_count_inputs_stops_at_max_configs(molecules_xyz, tmp_path):
    from protoalign_cli.extract import count_inputs

    silicon = tmp_path / "si.xyz"
    silicon.write_text("1\ncomment\nSi 0 0 0\n")
    with pytest.raises(ProtoalignError, match="element\\(s\\) Si not in the model"):
        count_inputs([molecules_xyz, silicon], HCNO, None)
    assert count_inputs([molecules_xyz, silicon], HCNO, 24) == [24, 0]  # configurations past the cap are not used
    assert count_inputs([molecules_xyz, silicon], HCNO, 10) == [10, 0]
    with pytest.raises(ProtoalignError, match="missing.xyz does not exist"):
        count_inputs([molecules_xyz, tmp_path / "missing.xyz"], HCNO, 5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("suffix", [".xyz", ".traj"])
def test_non_finite_positions_are_refused_naming_file_and_configuration(tmp_path, value, suffix):
    import ase.io

    frames = ase.io.read(write_molecules(tmp_path / "m.xyz", n_configs=4), index=":")
    frames[2].positions[1, 2] = value
    path = tmp_path / f"bad{suffix}"
    ase.io.write(path, frames)
    message = f"{path}, configuration 2: non-finite positions"
    with pytest.raises(ProtoalignError, match=message):
        scan_structures(path, HCNO)
    with pytest.raises(ProtoalignError, match=message):
        list(iter_selected([path], [4], selected_indices(4, (0, 1), None)))


@pytest.mark.parametrize("name, text", [("empty.xyz", ""), ("blank.extxyz", "\n\n"), ("empty.traj", "")])
def test_empty_files_are_refused_with_one_wording(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ProtoalignError, match=f"^structure file {path} holds no configurations$"):
        scan_structures(path, HCNO)


def test_the_quick_scan_holds_one_frame_at_a_time(tmp_path):
    """Scanning 20,000 frames allocates no more at its peak than scanning 200: nothing is kept per frame
    (a list of atomic numbers per frame once grew by ~110 bytes a frame)."""
    import tracemalloc

    frame = "3\nProperties=species:S:1:pos:R:3\nO 0 0 0\nH 0 0 1\nH 0 1 0\n"
    peaks = {}
    for n in (200, 20_000):
        path = tmp_path / f"w{n}.xyz"
        path.write_text(frame * n)
        tracemalloc.start()
        assert scan_structures(path, HCNO) == n
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[20_000] < peaks[200] + 100_000  # bytes; the old scan needed ~2 MB more here
