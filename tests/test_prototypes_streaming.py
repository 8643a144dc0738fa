"""protoalign prototypes in bounded memory: samples, streamed statistics, shards read directly, bad shards."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from protoalign_cli.prototypes.assignment import assign
from protoalign_cli.prototypes.build import summary_path
from protoalign_cli.prototypes.clustering import member_statistics
from protoalign_cli.prototypes.features import feature_columns, feature_scaling, select_features
from protoalign_cli.prototypes.sources import open_sources
from protoalign_cli.prototypes.streaming import (
    ClusterSettings,
    FeatureMoments,
    MemberAccumulator,
    cluster_element,
    merge_moments,
    prototypes_of_elements,
    sample_indices,
)

from helpers import assert_one_line_error, assert_untouched, snapshot
from prototype_files import (
    assert_consistent,
    build,
    file_contents,
    read_all_latents,
    run_cli,
    split_into_shards,
    write_synthetic_latents,
)


def test_merged_moments_and_samples():
    rng = np.random.default_rng(4)
    x = rng.normal(loc=3.0, size=(1000, 4)) * [1.0, 1e-3, 5.0, 0.0]
    moments = FeatureMoments(4)
    for start in (0, 7, 300, 301, 999):
        moments.add(x[start:{0: 7, 7: 300, 300: 301, 301: 999, 999: 1000}[start]])
    for standardize_features in (True, False):
        mean, std = moments.scaling(standardize_features)
        expected_mean, expected_std = feature_scaling(x, standardize_features)
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(std, expected_std, rtol=1e-11)
    count, mean, m2 = merge_moments(np.array([0, 3]), np.array([0.0, 2.0]), np.array([0.0, 2.0]),
                                    np.array([2, 0]), np.array([5.0, 9.0]), np.array([8.0, 0.0]))
    np.testing.assert_array_equal(count, [2, 3])
    np.testing.assert_array_equal(mean, [5.0, 2.0])
    np.testing.assert_array_equal(m2, [8.0, 2.0])
    sample = sample_indices(10_000, 300, seed=5)
    assert len(np.unique(sample)) == 300 and np.all(np.diff(sample) > 0) and sample[-1] < 10_000
    np.testing.assert_array_equal(sample, sample_indices(10_000, 300, seed=5))
    np.testing.assert_array_equal(sample_indices(20, 300, seed=5), np.arange(20))


def test_streamed_member_statistics_equal_the_in_memory_ones():
    rng = np.random.default_rng(6)
    local_id = rng.integers(0, 5, size=5000)
    local_id[local_id == 3] = 4  # prototype 3 has no members and is dropped
    distance, energy = rng.gamma(2.0, size=5000), rng.normal(size=5000)
    members = MemberAccumulator(5, 5000)
    for start in range(0, 5000, 777):
        members.add(local_id[start:start + 777], distance[start:start + 777], energy[start:start + 777])
    used, streamed = members.statistics()
    np.testing.assert_array_equal(used, [True, True, True, False, True])
    expected = member_statistics(np.searchsorted([0, 1, 2, 4], local_id), distance, energy, 4)
    np.testing.assert_array_equal(streamed["count"], expected["count"])
    np.testing.assert_allclose(streamed["energy_mean"], expected["energy_mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(streamed["energy_std"], expected["energy_std"], rtol=1e-12)
    np.testing.assert_allclose(streamed["radius"], expected["radius"], rtol=2.0 ** -23)  # float32 distances


def test_elements_that_fit_are_clustered_whole_as_before(tmp_path):
    """Atoms read chunk by chunk over several files give what clustering everything in memory gives, bit for bit."""
    files = [write_synthetic_latents(tmp_path / "one.h5", {1: 2, 6: 3}, seed=1),
             write_synthetic_latents(tmp_path / "two.h5", {1: 2, 8: 3}, seed=2)]
    sources = open_sources(files)
    columns = feature_columns(sources.first, "all")
    settings = ClusterSettings(k="auto", k_grid=(2, 4, 8), criterion="bic", standardize=True, niter=10, seed=4, gpu=False,
                               chunk_rows=97)
    elements = prototypes_of_elements(sources, columns, sources.element_counts(97), settings, report=lambda line: None)
    latent, atomic_number, energy = read_all_latents(files)
    assert [e.z for e in elements] == [1, 6, 8]
    for element in elements:
        rows = atomic_number == element.z
        expected = cluster_element(element.z, select_features(latent, columns)[rows], energy[rows], settings)
        assert element.n_atoms == element.n_sample == expected.n_atoms == rows.sum()
        for name in ("centroid", "feature_mean", "feature_std"):
            np.testing.assert_array_equal(getattr(element, name), getattr(expected, name))
        for name, values in expected.statistics.items():
            np.testing.assert_array_equal(element.statistics[name], values)
        assert (element.curve, element.notes, element.n_distinct) == (expected.curve, expected.notes, expected.n_distinct)


def test_small_inputs_give_the_prototypes_of_the_previous_version(tmp_path):
    """Values of the in-memory build before streaming (protoalign 884e3e5) on the same files and options."""
    first = write_synthetic_latents(tmp_path / "one.h5", {1: 2, 6: 2}, seed=1)
    second = write_synthetic_latents(tmp_path / "two.h5", {1: 2, 8: 2}, seed=2)
    prototypes = build([first, second], tmp_path / "p.h5", k=2, niter=5, seed=3)
    assert prototypes.element.tolist() == [1, 1, 6, 6, 8, 8]
    assert prototypes.count.tolist() == [360, 120, 120, 120, 120, 120]
    assert prototypes.n_distinct.tolist() == [480, 240, 240]
    np.testing.assert_allclose(prototypes.energy_mean, [0.664401733, 0.00311102, 1.001974655, -0.008413735, 0.994942238,
                                                        0.011575077], atol=1e-9)
    np.testing.assert_allclose(prototypes.energy_std, [0.478869922, 0.098329239, 0.10070388, 0.10437218, 0.108126415,
                                                       0.100380238], atol=1e-9)
    np.testing.assert_allclose(prototypes.radius, [3.458922, 0.503102, 1.552407, 1.363012, 1.274232, 1.395409], atol=2e-6)
    np.testing.assert_allclose(prototypes.feature_mean[:, :2], [[-2.676166723, -3.31373374], [25.729823209, 1.444945916],
                                                                [4.75222783, 21.361791287]], atol=1e-9)


def test_elements_larger_than_the_sample_are_streamed(tmp_path):
    """A sample for k-means and K, every atom for statistics: what may differ from the whole-element build, and by how much."""
    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2, 6: 4}, n_per_cluster=400, seed=8)
    whole = build(latents, tmp_path / "whole.h5", k="auto", seed=2)
    streamed = build(latents, tmp_path / "streamed.h5", k="auto", seed=2, sample_atoms=500)
    # Exact over all atoms: memberships, counts, energies and the standardization (radius from float32 distances).
    assert_consistent(streamed, *read_all_latents(latents), radius_rtol=2.0 ** -22)
    np.testing.assert_array_equal(streamed.n_atoms, [800, 1600])
    np.testing.assert_array_equal(streamed.n_distinct, [500, 500])  # distinct atoms of the sample
    assert [note for note in streamed.notes if "seeded sample of 500" in note] == [
        f"Z={z}: {n} atoms, more than --sample-atoms; clustered (and K chosen) on a seeded sample of 500, statistics "
        "over all atoms" for z, n in ((1, 800), (6, 1600))]
    summary = json.loads(summary_path(tmp_path / "streamed.h5").read_text())
    assert {z: e["n_sample"] for z, e in summary["results"]["elements"].items()} == {"1": 500, "6": 500}
    # Against the whole-element build: same elements, K, partition, energies and map; centroids and radii differ a little.
    np.testing.assert_array_equal(streamed.element, whole.element)
    np.testing.assert_allclose(streamed.feature_mean, whole.feature_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.feature_std, whole.feature_std, rtol=1e-12)
    assert [c["k"] for c in streamed.curves.values()] == [c["k"] for c in whole.curves.values()]
    latent, atomic_number, _ = read_all_latents(latents)
    streamed_id, _ = assign(streamed, latent, atomic_number)
    whole_id, _ = assign(whole, latent, atomic_number)
    match = {int(w): int(s) for w, s in zip(whole_id, streamed_id)}
    assert len(match) == len(set(match.values())) == whole.n_prototypes  # the same partition, numbered differently
    order = [match[p] for p in range(whole.n_prototypes)]
    np.testing.assert_array_equal(streamed.count[order], whole.count)
    np.testing.assert_allclose(streamed.energy_mean[order], whole.energy_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.energy_std[order], whole.energy_std, rtol=1e-9)
    assert np.abs(streamed.centroid[order] - whole.centroid).max() < 0.05  # standardized units; clusters ~0.05 wide
    np.testing.assert_allclose(streamed.radius[order], whole.radius, rtol=0.1)


def test_shards_are_read_directly_like_the_merged_file(tmp_path):
    whole = write_synthetic_latents(tmp_path / "whole.h5", {1: 2, 6: 3, 8: 2}, seed=9)
    shards = split_into_shards(whole, 3, tmp_path)
    from_whole = build(whole, tmp_path / "p_whole.h5", k="auto", seed=1)
    from_shards = build(shards[::-1], tmp_path / "p_shards.h5", k="auto", seed=1, sample_atoms=100)
    from_shards_in_memory = build(shards, tmp_path / "p_shards_mem.h5", k="auto", seed=1)
    assert [Path(f["path"]).name for f in from_shards_in_memory.latent_files] == ["shard0.h5", "shard1.h5", "shard2.h5"]
    contents = file_contents(tmp_path / "p_whole.h5")
    for key, value in file_contents(tmp_path / "p_shards_mem.h5").items():
        if key not in ("/@latent_files", "/@command_line"):
            assert value == contents[key], key
    assert_consistent(from_shards, *read_all_latents(shards[::-1]), radius_rtol=2.0 ** -22)
    assert from_shards.elements.tolist() == from_whole.elements.tolist()


def truncate(path: Path) -> None:
    """Keep the first half of a file's bytes (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def mark_incomplete(path: Path) -> None:
    """Flag a latent file as an interrupted extract."""
    with h5py.File(path, "a") as handle:
        handle.attrs["complete"] = False


@pytest.mark.parametrize("case, match", [
    ("missing", "shard(s) 1/3 of the array of"),
    ("twice", "is given more than once"),
    ("with_unsharded", "would repeat atoms"),
    ("other_model", "differ in model"),
    ("truncated", "truncated file"),
    ("incomplete", "is incomplete"),
])
def test_bad_shards_are_refused_and_nothing_is_written(tmp_path, case, match):
    whole = write_synthetic_latents(tmp_path / "whole.h5", {1: 2, 6: 2}, seed=9)
    (tmp_path / "other").mkdir()
    shards = split_into_shards(whole, 3, tmp_path)
    inputs = {
        "missing": [shards[0], shards[2]],
        "twice": [*shards, tmp_path / "." / "shard1.h5"],
        "with_unsharded": [*shards, whole],
        "other_model": [shards[0], split_into_shards(whole, 3, tmp_path / "other", model_sha256="b" * 64)[1], shards[2]],
    }.get(case, shards)
    if case == "truncated":
        truncate(shards[2])
    elif case == "incomplete":
        mark_incomplete(shards[1])
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli(*inputs, "--out", tmp_path / "p.h5", "--sample-atoms", "50"), match)
    assert_untouched(tmp_path, before)


def test_each_pass_over_the_latents_reports_progress_in_a_log(tmp_path, monkeypatch):
    """Output piped to a file (a SLURM log): plain progress lines of the reading and the statistics pass."""
    from protoalign_cli import progress

    latents = write_synthetic_latents(tmp_path / "latents.h5", {1: 2, 6: 2}, n_per_cluster=300, seed=3)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)  # a line per chunk
    result = run_cli(latents, "--out", tmp_path / "p.h5", "--k", "2", "--sample-atoms", "500")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr
    for desc in ("prototypes: reading latents", "prototypes: member statistics"):
        assert [line for line in lines if line.startswith(f"{desc}: 1200/1200 atoms (100%)")], result.stderr
