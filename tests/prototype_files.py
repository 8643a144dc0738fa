"""Synthetic latent files, prototype builds and the brute-force check that the prototype tests share."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

from protoalign_cli.cli import main
from protoalign_cli.io import schema
from protoalign_cli.prototypes.assignment import assign, load_prototypes
from protoalign_cli.prototypes.build import PrototypesRequest, build_prototypes


def write_synthetic_latents(path: Path, clusters: dict[int, int], n_per_cluster: int = 120, d: int = 12, seed: int = 0,
                            model_sha256: str = "a" * 64, head: str = "Default", n_energy: int = 2,
                            duplicates: dict[int, int] | None = None) -> Path:
    """A latent file (via schema.LatentWriter) whose atoms of element Z form ``clusters[Z]`` well separated
    unit-variance Gaussian clusters (centres ~ N(0, 20^2)); cluster c's energies ~ N(c, 0.1^2) eV.

    ``duplicates[Z] = m`` instead gives element Z only m distinct atoms (each repeated).
    """
    rng = np.random.default_rng(seed)
    n_interaction = d - n_energy
    layout = [{"name": "interaction_0", "kind": "interaction", "start": 0, "size": n_interaction}]
    layout += [{"name": f"readout_{k}", "kind": "energy", "start": n_interaction + k, "size": 1} for k in range(n_energy)]
    header = schema.LatentHeader(
        model_sha256=model_sha256, model_path="synthetic.model", mace_version="0.3.16", model_type="ScaleShiftMACE",
        r_max=5.0, e0s={head: {str(z): -10.0 * z for z in (1, 6, 7, 8)}}, heads=[head], head=head, layout=layout,
        source_files=["synthetic.xyz"], dtype="float64", command_line="synthetic", protoalign_version="test",
    )
    latent, energy, numbers = [], [], []
    for z, k in clusters.items():
        centres = rng.normal(scale=20.0, size=(k, d))
        for c in range(k):
            latent.append(centres[c] + rng.normal(size=(n_per_cluster, d)))
            energy.append(rng.normal(loc=float(c), scale=0.1, size=n_per_cluster))
            numbers.append(np.full(n_per_cluster, z))
    for z, m in (duplicates or {}).items():
        distinct = rng.normal(size=(m, d))
        latent.append(np.repeat(distinct, 5, axis=0))
        energy.append(np.repeat(rng.normal(size=m), 5))
        numbers.append(np.full(5 * m, z))
    latent = np.concatenate(latent) if latent else np.zeros((0, d))
    order = rng.permutation(len(latent))
    n = len(order)
    energy_minus_e0 = np.concatenate(energy)[order] if energy else np.zeros(0)
    atomic_number = np.concatenate(numbers)[order] if numbers else np.zeros(0)
    rows = {
        schema.LATENT: latent[order], schema.ENERGY_MINUS_E0: energy_minus_e0,
        schema.NODE_ENERGY: energy_minus_e0 - 10.0 * atomic_number, schema.ATOMIC_NUMBER: atomic_number,
        schema.CONFIG_INDEX: np.arange(n), schema.ATOM_INDEX: np.zeros(n), schema.SOURCE_FILE_INDEX: np.zeros(n),
    }
    with h5py.File(path, "w") as handle:
        writer = schema.LatentWriter(handle, header, d, "float64")
        writer.append(rows, n)
        writer.finish()
    return path


def split_into_shards(whole: Path, n: int, folder: Path, **header_changes) -> list[Path]:
    """The rows of latent file ``whole`` as n shard files ``I/N`` (consecutive pieces, in order)."""
    latents = schema.read_latents(whole)
    header = schema.LatentHeader(**{**vars(latents.header), **header_changes})
    bounds = np.linspace(0, latents.n_atoms, n + 1).astype(int)
    paths = []
    for index in range(n):
        rows = slice(bounds[index], bounds[index + 1])
        path = folder / f"shard{index}.h5"
        with h5py.File(path, "w") as handle:
            writer = schema.LatentWriter(handle, dataclasses.replace(header, shard=f"{index}/{n}"),
                                         latents.latent.shape[1], header.dtype)
            writer.append({name: getattr(latents, name)[rows] for name in (schema.LATENT, *schema.PER_ATOM_DATASETS)}, 1)
            writer.finish()
        paths.append(path)
    return paths


def build(latent_paths, out, **options):
    """Run the library build and load the result."""
    paths = latent_paths if isinstance(latent_paths, (list, tuple)) else [latent_paths]
    build_prototypes(PrototypesRequest(latents=[Path(p) for p in paths], out=Path(out), **options))
    return load_prototypes(out)


def read_all_latents(paths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated latent rows, atomic numbers and energies minus E0 (eV) of latent files."""
    parts = [schema.read_latents(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    return (np.concatenate([p.latent for p in parts]), np.concatenate([p.atomic_number for p in parts]),
            np.concatenate([p.energy_minus_e0 for p in parts]))


def assert_consistent(prototypes, latent: np.ndarray, atomic_number: np.ndarray, energy: np.ndarray,
                      radius_rtol: float = 1e-12) -> None:
    """Recompute everything in plain numpy and compare with the file and with ``assign``.

    Standardization from the raw latents; for every atom the nearest centroid of its element by brute
    force; per prototype member count, energy mean/std (eV) and 95th-percentile radius (to
    ``radius_rtol``: streamed elements keep member distances in float32).
    """
    prototype_id, distance = assign(prototypes, latent, atomic_number)
    assert set(np.unique(atomic_number)) == set(prototypes.elements.tolist())
    for e, z in enumerate(prototypes.elements):
        rows = atomic_number == z
        x = latent[rows][:, prototypes.columns].astype(np.float64)
        if prototypes.standardized:
            std = x.std(axis=0)
            np.testing.assert_allclose(prototypes.feature_mean[e], x.mean(axis=0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(prototypes.feature_std[e], np.where(std > 1e-12 * np.maximum(1, abs(x.mean(0))), std, 1.0),
                                       rtol=1e-10)
        scaled = (x - prototypes.feature_mean[e]) / prototypes.feature_std[e]
        ids = np.flatnonzero(prototypes.element == z)
        all_distances = np.sqrt(((scaled[:, None, :] - prototypes.centroid[ids][None, :, :]) ** 2).sum(axis=2))
        nearest = all_distances.argmin(axis=1)
        sorted_distances = np.sort(all_distances, axis=1)
        clear = (sorted_distances[:, 1] - sorted_distances[:, 0] > 1e-9) if len(ids) > 1 else np.ones(len(x), bool)
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(prototype_id[rows][clear], ids[nearest][clear])
        np.testing.assert_allclose(distance[rows], sorted_distances[:, 0], rtol=1e-9, atol=1e-9)
        for p in ids:
            members = prototype_id[rows] == p
            assert prototypes.count[p] == members.sum() > 0
            np.testing.assert_allclose(prototypes.energy_mean[p], energy[rows][members].mean(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(prototypes.energy_std[p], energy[rows][members].std(), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(prototypes.radius[p], np.percentile(distance[rows][members], 95), rtol=radius_rtol)
    assert prototypes.count.sum() == len(atomic_number)


def file_contents(path: Path) -> dict:
    """Every attribute and dataset of an HDF5 file, as Python values."""
    contents = {}
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            for key, value in obj.attrs.items():
                contents[f"{name}@{key}"] = value.tolist() if hasattr(value, "tolist") else value
            if isinstance(obj, h5py.Dataset):
                contents[name] = obj[()].tolist()
        visit("/", handle)
        handle.visititems(visit)
    return contents


def run_cli(*args):
    return CliRunner().invoke(main, ["prototypes", *map(str, args)])

