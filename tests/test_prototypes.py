"""protoalign prototypes: per-element FAISS prototypes, their statistics, K selection, assignment, bad input."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from protoalign_cli.io import schema
from protoalign_cli.cli import main
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.extract import ExtractRequest, run_extract
from protoalign_cli.prototypes.assignment import assign, load_prototypes
from protoalign_cli.prototypes.build import parse_k, parse_k_grid, summary_path
from protoalign_cli.prototypes.clustering import (
    gpu_available,
    kmeans_information_criteria,
    member_statistics,
    unique_rows,
    within_cluster_sse,
)
from protoalign_cli.prototypes.features import feature_scaling, select_features, standardize
from protoalign_cli.prototypes.search import flat_index, nearest_prototypes

from helpers import assert_one_line_error
from prototype_files import assert_consistent, build, file_contents, read_all_latents, run_cli, write_synthetic_latents

SOURCE_MOLECULES = ("benzene", "ethanol", "malonaldehyde", "toluene", "uracil")


# ----------------------------------------------------------------------------- helpers


def extract_latents(model, configs, out, max_configs=None) -> Path:
    """Latent file of ``model`` over ``configs`` (library call)."""
    run_extract(ExtractRequest(model=str(model), configs=[Path(configs)], out=Path(out), max_configs=max_configs))
    return Path(out)


# ----------------------------------------------------------------------------- pure functions


def test_select_features_and_standardize():
    latent = np.arange(24, dtype=np.float64).reshape(4, 6)
    contiguous = select_features(latent, np.array([2, 3, 4]))
    assert np.shares_memory(contiguous, latent)
    np.testing.assert_array_equal(contiguous, latent[:, 2:5])
    np.testing.assert_array_equal(select_features(latent, np.array([0, 5])), latent[:, [0, 5]])
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    mean, std = feature_scaling(x)
    np.testing.assert_allclose(mean, [3.0, 5.0, 5.0])
    np.testing.assert_allclose(std, [np.sqrt(8 / 3), 1.0, np.std([2.0, 4.0, 9.0])])
    scaled = standardize(x, mean, std)
    np.testing.assert_allclose(scaled[:, 1], 0.0)
    np.testing.assert_allclose(scaled.std(axis=0), [1.0, 0.0, 1.0])
    identity_mean, identity_std = feature_scaling(x, standardize=False)
    np.testing.assert_array_equal(standardize(x, identity_mean, identity_std), x)


def test_information_criteria_equal_the_explicit_gaussian_mixture_likelihood():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)) * [1.0, 2.0, 0.5]
    cluster = np.repeat([0, 1, 2], [10, 12, 18])
    centroid = np.stack([x[cluster == c].mean(axis=0) for c in range(3)])
    sse = within_cluster_sse(x, centroid, cluster)
    np.testing.assert_allclose(sse, ((x - centroid[cluster]) ** 2).sum(axis=0))
    variance = sse / len(x)
    weights = np.bincount(cluster) / len(x)
    log_density = np.log(weights[cluster]) + np.sum(
        -0.5 * np.log(2 * np.pi * variance) - (x - centroid[cluster]) ** 2 / (2 * variance), axis=1)
    scores = kmeans_information_criteria(sse, np.bincount(cluster))
    np.testing.assert_allclose(scores["log_likelihood"], log_density.sum(), rtol=1e-12)
    n_parameters = 3 * 3 + 3 + 2
    np.testing.assert_allclose(scores["bic"], -2 * log_density.sum() + n_parameters * np.log(40), rtol=1e-12)
    np.testing.assert_allclose(scores["aic"], -2 * log_density.sum() + 2 * n_parameters, rtol=1e-12)
    rescaled = kmeans_information_criteria(sse * np.array([4.0, 1.0, 9.0]), np.bincount(cluster))
    other = kmeans_information_criteria(sse * 0.5, np.bincount(cluster))
    rescaled_other = kmeans_information_criteria(sse * 0.5 * np.array([4.0, 1.0, 9.0]), np.bincount(cluster))
    np.testing.assert_allclose(rescaled["bic"] - scores["bic"], rescaled_other["bic"] - other["bic"], rtol=1e-9)


def test_member_statistics_and_nearest_prototypes_against_brute_force():
    rng = np.random.default_rng(2)
    centroid = rng.normal(size=(7, 5))
    centroid = centroid.astype(np.float32).astype(np.float64)
    x = rng.normal(size=(20000, 5))
    x[3] = np.nan
    local_id, distance = nearest_prototypes(flat_index(centroid), centroid, x)
    assert local_id[3] == -1 and distance[3] == np.inf
    keep = np.ones(len(x), bool)
    keep[3] = False
    brute = np.sqrt(((x[keep, None, :] - centroid[None]) ** 2).sum(axis=2))
    np.testing.assert_array_equal(local_id[keep], brute.argmin(axis=1))
    np.testing.assert_allclose(distance[keep], brute.min(axis=1), rtol=1e-12)
    energy = rng.normal(size=keep.sum())
    stats = member_statistics(local_id[keep], distance[keep], energy, 7)
    for p in range(7):
        members = local_id[keep] == p
        assert stats["count"][p] == members.sum()
        np.testing.assert_allclose(stats["energy_mean"][p], energy[members].mean(), rtol=1e-12)
        np.testing.assert_allclose(stats["energy_std"][p], energy[members].std(), rtol=1e-10)
        np.testing.assert_allclose(stats["radius"][p], np.percentile(distance[keep][members], 95), rtol=1e-12)


def test_float32_near_ties_are_decided_in_float64():
    centroid = np.array([[-1.0, 0.0], [1.0, 0.0]])
    x = np.array([[1e-6, 1000.0], [-1e-6, 1000.0], [1e-6, -1000.0]])
    index = flat_index(centroid)
    d2_float32, _ = index.search(x.astype(np.float32), 2)
    assert d2_float32[0, 0] == d2_float32[0, 1]  # float32 cannot tell the two centroids apart
    local_id, distance = nearest_prototypes(index, centroid, x)
    np.testing.assert_array_equal(local_id, [1, 0, 1])
    np.testing.assert_allclose(distance, np.sqrt((1 - 1e-6) ** 2 + 1e6), rtol=1e-15)


def test_unique_rows_and_parsers():
    x = np.array([[1.0, 2.0], [0.0, 1.0], [1.0, 2.0], [1.0, 2.0]], dtype=np.float32)
    distinct, counts = unique_rows(x)
    assert sorted(map(tuple, distinct.tolist())) == [(0.0, 1.0), (1.0, 2.0)]
    assert dict(zip(map(tuple, distinct.tolist()), counts.tolist())) == {(0.0, 1.0): 1, (1.0, 2.0): 3}
    assert parse_k("auto") == "auto" and parse_k("12") == 12
    assert parse_k_grid("8, 2,4,4") == (2, 4, 8)
    for bad in ("0", "-3", "x", "2.5"):
        with pytest.raises(ProtoalignError, match="--k"):
            parse_k(bad)
    for bad in ("0,2", "a,b", ""):
        with pytest.raises(ProtoalignError, match="--k-grid"):
            parse_k_grid(bad)


# ----------------------------------------------------------------------------- synthetic latent files


def test_k_auto_recovers_the_number_of_clusters_with_bic(tmp_path):
    truth = {1: 2, 6: 4, 7: 8, 8: 16}
    latents = write_synthetic_latents(tmp_path / "latents.h5", truth)
    prototypes = build(latents, tmp_path / "p.h5", k="auto", criterion="bic")
    for z, k in truth.items():
        curve = prototypes.curves[z]
        assert curve["k"] == [2, 4, 8, 16, 32, 64]
        assert curve["k"][int(np.argmin(curve["bic"]))] == k
        assert np.sum(prototypes.element == z) == k
    assert_consistent(prototypes, *read_all_latents(latents))
    for p in range(prototypes.n_prototypes):
        assert prototypes.energy_std[p] < 0.2  # each prototype is one synthetic cluster (energies ~ N(c, 0.1))
    summary = json.loads(summary_path(tmp_path / "p.h5").read_text())
    assert summary["results"]["elements"]["7"]["k_chosen"] == 8
    assert summary["results"]["elements"]["7"]["curve"]["k"] == [2, 4, 8, 16, 32, 64]
    assert summary["inputs"]["criterion"] == "bic" and summary["command"] == "prototypes"


def test_k_auto_with_aic_on_an_easy_case(tmp_path):
    truth = {1: 3, 6: 5}
    latents = write_synthetic_latents(tmp_path / "latents.h5", truth, n_per_cluster=200, seed=3)
    prototypes = build(latents, tmp_path / "p.h5", k="auto", criterion="aic", k_grid="1,2,3,4,5,6,8")
    assert {z: int(np.sum(prototypes.element == z)) for z in truth} == truth
    assert prototypes.criterion == "aic" and prototypes.k_grid == [1, 2, 3, 4, 5, 6, 8]


def test_fixed_k_few_distinct_atoms_and_missing_elements(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 4, 6: 2}, duplicates={8: 3})
    runner = CliRunner()
    result = runner.invoke(main, ["prototypes", str(latents), "--out", str(tmp_path / "p.h5"), "--k", "6", "--features", "interaction"])
    assert result.exit_code == 0, result.output
    assert "Z=8: 3 distinct atoms" in result.output and "no source atoms of Z=7" in result.output
    prototypes = load_prototypes(tmp_path / "p.h5")
    assert {int(z): int(np.sum(prototypes.element == z)) for z in prototypes.elements} == {1: 6, 6: 6, 8: 3}
    assert prototypes.features == "interaction" and prototypes.columns.tolist() == list(range(10))
    latent, atomic_number, energy = read_all_latents(latents)
    assert_consistent(prototypes, latent, atomic_number, energy)
    oxygen = atomic_number == 8
    np.testing.assert_allclose(prototypes.radius[prototypes.element == 8], 0.0, atol=1e-6)
    prototype_id, distance = assign(prototypes, latent[:5], np.full(5, 7))
    assert (prototype_id == -1).all() and np.isinf(distance).all()
    assert oxygen.sum() == prototypes.count[prototypes.element == 8].sum() == 15
    summary = json.loads(summary_path(tmp_path / "p.h5").read_text())
    assert summary["results"]["elements_without_atoms"] == [7]
    assert any("Z=8" in note for note in summary["results"]["notes"])


def test_no_standardize_and_energy_features(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2, 6: 3})
    prototypes = build(latents, tmp_path / "p.h5", k=3, features="energy", standardize=False)
    assert prototypes.columns.tolist() == [10, 11] and not prototypes.standardized
    np.testing.assert_array_equal(prototypes.feature_mean, 0.0)
    np.testing.assert_array_equal(prototypes.feature_std, 1.0)
    assert_consistent(prototypes, *read_all_latents(latents))


def test_same_inputs_and_seed_give_byte_identical_files(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 3, 6: 5, 8: 4})
    build(latents, tmp_path / "a.h5", k="auto", seed=7)
    build(latents, tmp_path / "b.h5", k="auto", seed=7)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    build(latents, tmp_path / "c.h5", k="auto", seed=8)
    assert file_contents(tmp_path / "a.h5").keys() == file_contents(tmp_path / "c.h5").keys()
    assert file_contents(tmp_path / "a.h5")["/@seed"] == 7


def test_provenance_is_copied_from_the_latent_files(tmp_path):
    first = write_synthetic_latents(tmp_path / "one.h5", {1: 2, 6: 2}, seed=1)
    second = write_synthetic_latents(tmp_path / "two.h5", {1: 2, 8: 2}, seed=2)
    prototypes = build([first, second], tmp_path / "p.h5", k=2, niter=5, seed=3)
    header = schema.read_latents(first).header
    assert prototypes.model_sha256 == header.model_sha256 and prototypes.model_path == header.model_path
    assert prototypes.head == header.head and prototypes.e0s == header.e0s and prototypes.layout == header.layout
    assert [f["path"] for f in prototypes.latent_files] == [str(first.resolve()), str(second.resolve())]
    assert prototypes.latent_files[0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert (prototypes.k_requested, prototypes.niter, prototypes.seed) == ("2", 5, 3)
    assert prototypes.versions["faiss-cpu"] != "not installed"
    assert prototypes.elements.tolist() == [1, 6, 8]
    assert int(np.sum(prototypes.element == 1)) == 2
    assert_consistent(prototypes, *read_all_latents([first, second]))


def test_assign_checks_its_input(tmp_path):
    prototypes = build(write_synthetic_latents(tmp_path / "latents.h5", {1: 2}), tmp_path / "p.h5", k=2)
    with pytest.raises(ProtoalignError, match="columns"):
        assign(prototypes, np.zeros((3, 5)), np.ones(3))
    with pytest.raises(ProtoalignError, match="atomic numbers"):
        assign(prototypes, np.zeros((3, 12)), np.ones(2))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("other, what", [
    (dict(model_sha256="b" * 64), "model"),
    (dict(head="other"), "head"),
    (dict(n_energy=3), "latent layout"),
])
def test_mixing_latent_files_is_refused(tmp_path, other, what):
    first = write_synthetic_latents(tmp_path / "one.h5", {1: 2})
    second = write_synthetic_latents(tmp_path / "two.h5", {1: 2}, **other)
    out = tmp_path / "p.h5"
    out.write_bytes(b"previous output")
    result = run_cli(first, second, "--out", out, "--k", "2", "--overwrite")
    assert_one_line_error(result, f"differ in {what}")
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "p.h5", "two.h5"]


@pytest.mark.parametrize("options, match", [
    (["--k", "0"], "--k must be >= 1"),
    (["--k", "many"], "--k must be a positive integer"),
    (["--k-grid", "0,4"], "--k-grid"),
    (["--niter", "0"], "--niter"),
    (["--sample-atoms", "0"], "--sample-atoms must be >= 1"),
])
def test_bad_options_are_refused(tmp_path, options, match):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2})
    result = run_cli(latents, "--out", tmp_path / "p.h5", *options)
    assert_one_line_error(result, match)
    assert not (tmp_path / "p.h5").exists()


def test_empty_corrupt_and_missing_inputs_are_refused(tmp_path):
    empty = write_synthetic_latents(tmp_path / "empty.h5", {})
    assert_one_line_error(run_cli(empty, "--out", tmp_path / "p.h5"), "holds no atoms")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    assert_one_line_error(run_cli(corrupt, "--out", tmp_path / "p.h5"), "cannot open latent file")
    truncated = tmp_path / "truncated.h5"
    whole = write_synthetic_latents(tmp_path / "whole.h5", {1: 2}).read_bytes()
    truncated.write_bytes(whole[:len(whole) // 2])
    assert_one_line_error(run_cli(truncated, "--out", tmp_path / "p.h5"), "truncated file")
    with h5py.File(tmp_path / "whole.h5", "a") as handle:
        del handle[schema.ATOMIC_NUMBER]
    assert_one_line_error(run_cli(tmp_path / "whole.h5", "--out", tmp_path / "p.h5"), "is corrupt")
    assert_one_line_error(run_cli(tmp_path / "absent.h5", "--out", tmp_path / "p.h5"), "does not exist")
    not_latents = tmp_path / "other.h5"
    with h5py.File(not_latents, "w") as handle:
        handle["x"] = 1
    assert_one_line_error(run_cli(not_latents, "--out", tmp_path / "p.h5"), "not a protoalign latent file")
    assert not (tmp_path / "p.h5").exists()


def test_existing_output_is_kept_without_overwrite(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2})
    out = tmp_path / "p.h5"
    assert run_cli(latents, "--out", out, "--k", "2").exit_code == 0
    before = out.read_bytes(), summary_path(out).read_bytes()
    assert_one_line_error(run_cli(latents, "--out", out, "--k", "3"), "exists; pass --overwrite")
    summary_path(out).unlink()
    assert_one_line_error(run_cli(latents, "--out", out, "--k", "3"), "exists; pass --overwrite")
    assert out.read_bytes() == before[0]
    assert run_cli(latents, "--out", out, "--k", "3", "--overwrite").exit_code == 0
    assert load_prototypes(out).n_prototypes == 3


def test_gpu_request_falls_back_to_the_cpu_with_a_message(tmp_path):
    if gpu_available():
        pytest.skip("FAISS sees a GPU here")
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2})
    result = run_cli(latents, "--out", tmp_path / "p.h5", "--k", "2", "--gpu")
    assert result.exit_code == 0 and "clustering on the CPU" in result.output


def test_corrupt_prototype_files_are_refused(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2, 6: 2})
    out = tmp_path / "p.h5"
    build(latents, out, k=2)
    with pytest.raises(ProtoalignError, match="not a protoalign prototype file"):
        load_prototypes(latents)
    with h5py.File(out, "a") as handle:
        del handle["faiss_index/6"]
    with pytest.raises(ProtoalignError, match="is corrupt"):
        load_prototypes(out)


def test_fixed_k_above_an_elements_atom_count_is_refused(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2}, duplicates={8: 3})  # 240 H, 15 O atoms
    result = run_cli(latents, "--out", tmp_path / "p.h5", "--k", "16")
    assert_one_line_error(result, "--k 16", "Z=8 (O): 15 atoms")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.h5"]
    assert run_cli(latents, "--out", tmp_path / "p.h5", "--k", "15").exit_code == 0


def test_k_auto_warns_about_single_member_prototypes(tmp_path):
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 6}, n_per_cluster=1, seed=5)  # 6 lone H atoms
    result = run_cli(latents, "--out", tmp_path / "p.h5", "--k", "auto", "--k-grid", "2,4")
    assert result.exit_code == 0, result.output
    prototypes = load_prototypes(tmp_path / "p.h5")
    warning = re.search(r"warning: Z=1 \(H\): (\d+) of (\d+) prototypes have a single member", result.stderr)
    assert warning, result.stderr
    assert int(warning[1]) == int(np.sum(prototypes.count == 1)) > 0
    assert int(warning[2]) == prototypes.n_prototypes
    np.testing.assert_allclose(prototypes.radius[prototypes.count == 1], 0.0, atol=1e-5)
    notes = json.loads(summary_path(tmp_path / "p.h5").read_text())["results"]["notes"]
    assert any(note.startswith(warning[0]) for note in notes)


def test_the_model_path_is_stored_absolute_so_readers_work_from_elsewhere(tmp_path, tiny_model, molecules_xyz,
                                                                          monkeypatch):
    import shutil

    from protoalign_cli.prototypes.assignment import pretrained_model

    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model, tmp_path / "models" / "foundation.model")
    monkeypatch.chdir(tmp_path)
    extract_latents("models/foundation.model", molecules_xyz, "latents.h5", max_configs=4)
    assert run_cli("latents.h5", "--out", "p.h5", "--k", "1").exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prototypes = load_prototypes(tmp_path / "p.h5")
    assert prototypes.model_path == str(tmp_path.resolve() / "models" / "foundation.model")
    assert pretrained_model(prototypes) == Path(prototypes.model_path)


def test_error_from_a_subprocess_is_one_line_without_traceback(tmp_path):
    first = write_synthetic_latents(tmp_path / "one.h5", {1: 2})
    second = write_synthetic_latents(tmp_path / "two.h5", {1: 2}, model_sha256="c" * 64)
    script = "from protoalign_cli.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", script, "prototypes", str(first), str(second), "--out", str(tmp_path / "p.h5")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("Error: ") and "differ in model" in result.stderr
    assert not (tmp_path / "p.h5").exists()


# ----------------------------------------------------------------------------- real MACE latents


def test_prototypes_of_the_tiny_model_latents(tiny_model, molecules_xyz, tmp_path):
    latents = extract_latents(tiny_model, molecules_xyz, tmp_path / "latents.h5")
    result = run_cli(latents, "--out", tmp_path / "p.h5", "--k", "auto", "--k-grid", "2,3,4")
    assert result.exit_code == 0, result.output
    prototypes = load_prototypes(tmp_path / "p.h5")
    assert prototypes.elements.tolist() == [1, 6, 7, 8]
    assert prototypes.model_sha256 == hashlib.sha256(Path(tiny_model).read_bytes()).hexdigest()
    assert_consistent(prototypes, *read_all_latents(latents))


@pytest.mark.shared
def test_prototypes_of_the_shared_source_geometries(shared_dir, tmp_path):
    model = shared_dir / "models" / "ani500k_small_CC.model"
    latent_files = [
        extract_latents(model, shared_dir / "data" / "md17-xtb" / f"{name}.xyz", tmp_path / f"{name}.h5", max_configs=100)
        for name in SOURCE_MOLECULES
    ]
    prototypes = build(latent_files, tmp_path / "p.h5", k=16)
    assert prototypes.elements.tolist() == [1, 6, 7, 8]
    assert all(np.sum(prototypes.element == z) == 16 for z in (1, 6, 7, 8))
    assert prototypes.model_path == str(model) and prototypes.head == "Default"
    assert [Path(f["path"]).name for f in prototypes.latent_files] == [f"{n}.h5" for n in SOURCE_MOLECULES]
    assert_consistent(prototypes, *read_all_latents(latent_files))
