"""protoalign extract / merge-latents through the library: energy identities, descriptors, shards, resume."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from protoalign_cli import extract as extract_module
from protoalign_cli.io import schema
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.extract import ExtractRequest, merge_latents, run_extract, summary_path
from protoalign_cli.mace.latents import latents_of_atoms
from protoalign_cli.mace.models import describe_model, load_model
from protoalign_cli.io.outputs import partial_path
from protoalign_cli.io.schema import read_latents
from tiny_models import E0, write_molecules

ARRAYS = (schema.LATENT, *schema.PER_ATOM_DATASETS)

# (fixture, head, expected scale, expected shift): the values tiny_models.build_tiny_mace sets,
# stored by MACE as float32 buffers before the model is cast to float64.
TINY_CASES = [
    ("tiny_model", None, 0.9, 0.07),
    ("tiny_l1_model", None, 0.9, 0.07),
    ("tiny_two_head_model", "dft", 0.8, 0.05),
    ("tiny_two_head_model", "cc", 1.1, 0.10),
    ("tiny_plain_model", None, 1.0, 0.0),
]


def extract(model, configs, out, **options) -> schema.Latents:
    """Run extract on the given files and read the result back."""
    configs = configs if isinstance(configs, (list, tuple)) else [configs]
    run_extract(ExtractRequest(model=str(model), configs=[Path(c) for c in configs], out=Path(out), **options))
    return read_latents(out)


def total_energies(model, xyz, head, n=None):
    """Total energies (eV) of the configurations in ``xyz`` from MACE's own ASE calculator."""
    import ase.io
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64", head=head or "Default")
    energies = []
    for atoms in ase.io.read(xyz, index=f":{n or ''}"):
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
    return np.array(energies)


def assert_energy_identity(latents: schema.Latents, reference_totals: np.ndarray) -> None:
    """Per atom E0 + sum(energy columns) + shift == node_energy (1e-10 eV); per config sum == MACE total (1e-8 eV)."""
    header = latents.header
    e0 = header.e0_of(latents.atomic_number)
    energy_columns = latents.latent[:, header.columns(("energy",))]
    assert energy_columns.shape[1] >= 2
    np.testing.assert_allclose(e0 + energy_columns.sum(axis=1) + header.head_shift(), latents.node_energy, rtol=0, atol=1e-10)
    np.testing.assert_allclose(latents.energy_minus_e0, latents.node_energy - e0, rtol=0, atol=1e-10)
    totals = np.bincount(latents.config_index, weights=latents.node_energy)
    np.testing.assert_allclose(totals, reference_totals, rtol=0, atol=1e-8)


@pytest.mark.parametrize("fixture, head, scale, shift", TINY_CASES)
def test_energy_identity_on_tiny_models(request, fixture, head, scale, shift, molecules_xyz, tmp_path):
    model = request.getfixturevalue(fixture)
    latents = extract(model, molecules_xyz, tmp_path / "latents.h5", head=head)
    header = latents.header
    head = head or "Default"
    assert header.head == head
    assert header.atomic_inter_scale[head] == pytest.approx(float(np.float32(scale)), abs=0)
    assert header.atomic_inter_shift[head] == pytest.approx(float(np.float32(shift)), abs=0)
    head_offset = 0.1 * header.heads.index(head)
    assert {int(z): e for z, e in header.e0s[head].items()} == {
        z: pytest.approx(float(np.float32(E0[z] + head_offset)), abs=0) for z in E0
    }
    assert_energy_identity(latents, total_energies(model, molecules_xyz, head))


def test_pair_repulsion_has_its_own_energy_column(tiny_plain_model, molecules_xyz, tmp_path):
    latents = extract(tiny_plain_model, molecules_xyz, tmp_path / "latents.h5")
    names = [block["name"] for block in latents.header.layout if block["kind"] == "energy"]
    assert names == ["pair_repulsion", "readout_0", "readout_1"]
    pair = latents.latent[:, latents.header.layout[2]["start"]]
    assert np.all(pair >= 0) and np.any(pair > 0)


@pytest.mark.parametrize("fixture, head", [("tiny_model", None), ("tiny_l1_model", None), ("tiny_two_head_model", "cc")])
def test_interaction_columns_equal_mace_descriptors(request, fixture, head, molecules_xyz, tmp_path):
    import ase.io
    from mace.calculators import MACECalculator

    model = request.getfixturevalue(fixture)
    latents = extract(model, molecules_xyz, tmp_path / "latents.h5", head=head, batch_size=5)
    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64", head=head or "Default")
    interaction = latents.latent[:, latents.header.columns(("interaction",))]
    for index, atoms in enumerate(ase.io.read(molecules_xyz, index=":")):
        descriptors = calc.get_descriptors(atoms)
        np.testing.assert_allclose(interaction[latents.config_index == index], descriptors, rtol=0, atol=1e-12)


def test_batch_size_does_not_change_the_arrays(tiny_l1_model, molecules_xyz, tmp_path):
    reference = extract(tiny_l1_model, molecules_xyz, tmp_path / "b32.h5", batch_size=32)
    for batch_size in (1, 7):
        other = extract(tiny_l1_model, molecules_xyz, tmp_path / f"b{batch_size}.h5", batch_size=batch_size)
        for name in ARRAYS:
            np.testing.assert_allclose(getattr(other, name), getattr(reference, name), rtol=0, atol=1e-12, err_msg=name)


def test_max_configs_takes_the_first_configurations(tiny_model, molecules_xyz, tmp_path):
    full = extract(tiny_model, molecules_xyz, tmp_path / "full.h5")
    first = extract(tiny_model, molecules_xyz, tmp_path / "first.h5", max_configs=5)
    assert first.header.n_configs_selected == 5
    assert sorted(set(first.config_index)) == [0, 1, 2, 3, 4]
    for name in ARRAYS:  # batches differ (5 vs 24 configurations): equal up to float64 rounding
        np.testing.assert_allclose(getattr(first, name), getattr(full, name)[: first.n_atoms], rtol=0, atol=1e-12)


def test_several_configs_files_are_labelled_by_file(tiny_model, molecules_xyz, tmp_path):
    other_xyz = write_molecules(tmp_path / "other.xyz", n_configs=6, seed=1)
    both = extract(tiny_model, [molecules_xyz, other_xyz], tmp_path / "both.h5", batch_size=5)
    assert both.header.source_files == [str(Path(molecules_xyz).resolve()), str(other_xyz.resolve())]
    first = extract(tiny_model, molecules_xyz, tmp_path / "first.h5")
    second = extract(tiny_model, other_xyz, tmp_path / "second.h5")
    in_first = both.source_file_index == 0
    for name in (schema.LATENT, schema.NODE_ENERGY, schema.CONFIG_INDEX, schema.ATOM_INDEX):
        np.testing.assert_allclose(getattr(both, name)[in_first], getattr(first, name), rtol=0, atol=1e-12)
        np.testing.assert_allclose(getattr(both, name)[~in_first], getattr(second, name), rtol=0, atol=1e-12)
    # --max-configs counts over all files in order: 24 from the first file, then 2 from the second
    capped = extract(tiny_model, [molecules_xyz, other_xyz], tmp_path / "capped.h5", max_configs=26)
    assert capped.header.n_configs_selected == 26
    assert sorted(set(capped.config_index[capped.source_file_index == 1])) == [0, 1]


def test_same_configs_file_twice_is_refused(tiny_model, molecules_xyz, tmp_path):
    with pytest.raises(ProtoalignError, match="more than once"):
        extract(tiny_model, [molecules_xyz, molecules_xyz], tmp_path / "x.h5")


def test_head_selection_changes_only_energy_columns(tiny_two_head_model, molecules_xyz, tmp_path):
    dft = extract(tiny_two_head_model, molecules_xyz, tmp_path / "dft.h5", head="dft")
    cc = extract(tiny_two_head_model, molecules_xyz, tmp_path / "cc.h5", head="cc")
    default = extract(tiny_two_head_model, molecules_xyz, tmp_path / "default.h5")
    assert (dft.header.head, cc.header.head, default.header.head) == ("dft", "cc", "dft")
    interaction = dft.header.columns(("interaction",))
    energy = dft.header.columns(("energy",))
    np.testing.assert_array_equal(dft.latent[:, interaction], cc.latent[:, interaction])
    assert np.abs(dft.latent[:, energy] - cc.latent[:, energy]).min() > 0
    np.testing.assert_array_equal(default.latent, dft.latent)


def sort_rows(latents: schema.Latents) -> dict[str, np.ndarray]:
    """Arrays in (source file path, config index, atom index) order: shard order does not matter."""
    paths = np.array(latents.header.source_files)[latents.source_file_index]
    order = np.lexsort((latents.atom_index, latents.config_index, paths))
    arrays = {name: getattr(latents, name)[order] for name in ARRAYS if name != schema.SOURCE_FILE_INDEX}
    arrays["source_file"] = paths[order]
    return arrays


def test_merged_shards_equal_an_unsharded_run(tiny_model, molecules_xyz, tmp_path):
    other_xyz = write_molecules(tmp_path / "other.xyz", n_configs=7, seed=1)
    configs = [molecules_xyz, other_xyz]
    # batch size 1: every configuration is evaluated alone, so the rows are bitwise reproducible
    # (other batch sizes group different configurations per shard: equal to float64 rounding)
    whole = extract(tiny_model, configs, tmp_path / "whole.h5", batch_size=1)
    shards = []
    for index in range(3):
        shard = extract(tiny_model, configs, tmp_path / f"shard{index}.h5", shard=(index, 3), batch_size=1)
        assert shard.header.n_configs_selected == len(range(index, 31, 3))
        shards.append(tmp_path / f"shard{index}.h5")
    merge_latents(shards[::-1], tmp_path / "merged.h5")
    merged = read_latents(tmp_path / "merged.h5")
    assert merged.header.shard == "merged"
    assert merged.header.n_configs_selected == 31
    assert merged.n_atoms == whole.n_atoms
    expected, got = sort_rows(whole), sort_rows(merged)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert summary_path(tmp_path / "merged.h5").is_file()


def test_merge_refuses_overlapping_or_foreign_inputs(tiny_model, tiny_l1_model, molecules_xyz, tmp_path):
    for index in range(2):
        extract(tiny_model, molecules_xyz, tmp_path / f"s{index}.h5", shard=(index, 2))
    extract(tiny_model, molecules_xyz, tmp_path / "third.h5", shard=(0, 3))
    extract(tiny_l1_model, molecules_xyz, tmp_path / "l1.h5", shard=(1, 2))
    out = tmp_path / "merged.h5"
    with pytest.raises(ProtoalignError, match="more than once"):
        merge_latents([tmp_path / "s0.h5", tmp_path / "s0.h5"], out)
    with pytest.raises(ProtoalignError, match="repeat atoms"):
        merge_latents([tmp_path / "s0.h5", tmp_path / "third.h5"], out)
    with pytest.raises(ProtoalignError, match="model_sha256 differs"):
        merge_latents([tmp_path / "s0.h5", tmp_path / "l1.h5"], out)
    with pytest.raises(ProtoalignError, match="does not exist"):
        merge_latents([tmp_path / "s0.h5", tmp_path / "missing.h5"], out)
    assert not out.exists() and not partial_path(out).exists()


def interrupt_on_second_batch(monkeypatch):
    """Make run_extract's second batch raise KeyboardInterrupt, as Ctrl-C would."""
    write_batch = extract_module._write_batch
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_batch(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_write_batch", flaky)


def test_resume_after_interrupt_gives_the_uninterrupted_arrays(tiny_model, molecules_xyz, tmp_path, monkeypatch):
    reference = extract(tiny_model, molecules_xyz, tmp_path / "reference.h5", batch_size=5)
    out = tmp_path / "latents.h5"
    with monkeypatch.context() as patch:
        interrupt_on_second_batch(patch)
        with pytest.raises(KeyboardInterrupt, match="kept, rerun with --resume"):  # still an interrupt: exit status 130
            extract(tiny_model, molecules_xyz, out, batch_size=5)
    partial = partial_path(out)
    assert partial.is_file() and not out.exists()
    import h5py

    with h5py.File(partial, "r") as handle:
        assert int(handle.attrs["configs_done"]) == 5
        assert not bool(handle.attrs["complete"])
    with pytest.raises(ProtoalignError, match="--resume"):
        extract(tiny_model, molecules_xyz, out, batch_size=5)
    with pytest.raises(ProtoalignError, match="n_configs_selected differs"):
        extract(tiny_model, molecules_xyz, out, batch_size=5, resume=True, max_configs=20)
    assert partial.is_file() and not out.exists()  # a refused resume keeps the work done so far
    resumed = extract(tiny_model, molecules_xyz, out, batch_size=5, resume=True)
    assert not partial.exists()
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(resumed, name), getattr(reference, name), err_msg=name)
    summary = summary_path(out).read_text()
    assert '"resumed_after_configs": 5' in summary


def test_resume_from_an_unreadable_partial_file_is_refused(tiny_model, molecules_xyz, tmp_path):
    out = tmp_path / "latents.h5"
    partial_path(out).write_bytes(os.urandom(4096))
    with pytest.raises(ProtoalignError, match="cannot resume.*unreadable"):
        extract(tiny_model, molecules_xyz, out, resume=True)
    assert not out.exists() and partial_path(out).is_file()
    extract(tiny_model, molecules_xyz, out, overwrite=True, max_configs=2)
    assert out.is_file() and not partial_path(out).exists()


def test_sigterm_becomes_an_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with extract_module._sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_latents_of_atoms_match_the_latent_file(tiny_two_head_model, molecules_xyz, tmp_path):
    import ase.io

    latents = extract(tiny_two_head_model, molecules_xyz, tmp_path / "latents.h5", head="cc")
    model = load_model(tiny_two_head_model)
    info = describe_model(model, tiny_two_head_model)
    rows = latents_of_atoms(model, info, ase.io.read(molecules_xyz, index=":"), head="cc", batch_size=7)
    for name in ARRAYS:
        if name != schema.SOURCE_FILE_INDEX:
            np.testing.assert_allclose(rows[name], getattr(latents, name), rtol=0, atol=1e-12, err_msg=name)
    with pytest.raises(ProtoalignError, match="head 'pbe' is not one of the model's heads"):
        latents_of_atoms(model, info, ase.io.read(molecules_xyz, index=":2"), head="pbe")
    empty = latents_of_atoms(model, info, [], head="cc")
    assert empty[schema.LATENT].shape == (0, info.latent_dim) and empty[schema.NODE_ENERGY].shape == (0,)


def test_summary_records_inputs_and_results(tiny_model, molecules_xyz, tmp_path):
    import json

    out = tmp_path / "latents.h5"
    extract(tiny_model, molecules_xyz, out, max_configs=3)
    summary = json.loads(summary_path(out).read_text())
    assert summary["command"] == "extract"
    assert summary["inputs"]["max_configs"] == 3
    assert summary["results"]["n_configs"] == 3
    assert summary["results"]["n_atoms"] == read_latents(out).n_atoms


@pytest.mark.shared
def test_energy_identity_and_descriptors_on_the_shared_model(shared_dir, tmp_path):
    import ase.io
    from mace.calculators import MACECalculator

    model = shared_dir / "models" / "ani500k_small_CC.model"
    aspirin = shared_dir / "data" / "md17-pbe" / "aspirin.xyz"
    latents = extract(model, aspirin, tmp_path / "aspirin.h5", max_configs=50, batch_size=16)
    assert latents.header.n_configs_selected == 50 and latents.n_atoms == 50 * 21
    assert [b["size"] for b in latents.header.layout] == [64, 64, 1, 1]
    assert_energy_identity(latents, total_energies(model, aspirin, None, n=50))
    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    interaction = latents.latent[:, latents.header.columns(("interaction",))]
    for index, atoms in enumerate(ase.io.read(aspirin, index=":5")):
        np.testing.assert_allclose(interaction[latents.config_index == index], calc.get_descriptors(atoms), rtol=0, atol=1e-10)


def test_row_buffer_writes_whole_chunks_and_defers_signals(tiny_model, molecules_xyz, tmp_path):
    import h5py

    model = load_model(tiny_model)
    info = describe_model(model, tiny_model)
    import ase.io

    rows = latents_of_atoms(model, info, ase.io.read(molecules_xyz, index=":4"))
    rows[schema.SOURCE_FILE_INDEX] = np.zeros(len(rows[schema.ATOMIC_NUMBER]), dtype=np.int32)
    header = schema.LatentHeader(
        model_sha256="x", model_path="x", mace_version="x", model_type="x", r_max=4.0, e0s={}, heads=["Default"],
        head="Default", layout=[], source_files=["x"], dtype="float64", command_line="x", protoalign_version="x",
    )
    with h5py.File(tmp_path / "b.h5", "w") as handle:
        writer = schema.LatentWriter(handle, header, info.latent_dim, "float64")
        buffer = extract_module.RowBuffer(writer, min_rows=2 * len(rows[schema.ATOMIC_NUMBER]))
        buffer.add(rows, 4)
        assert writer.n_rows == 0 and writer.configs_done == 0
        buffer.add(rows, 4)
        assert writer.n_rows == 2 * len(rows[schema.ATOMIC_NUMBER]) and writer.configs_done == 8
        buffer.add(rows, 4)
        # a SIGTERM arriving while rows are written is delivered only after the progress attributes
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        original_append = writer.append

        def append_then_signal(*args):
            os.kill(os.getpid(), signal.SIGTERM)
            original_append(*args)

        writer.append = append_then_signal
        try:
            with pytest.raises(KeyboardInterrupt):
                buffer.flush()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert writer.configs_done == 12 and buffer.parts == []
