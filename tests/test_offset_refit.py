"""The offset refit: least squares as mace's E0 estimator, a known offset removed from a real tiny model,
and the rank-deficient (one composition) case."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

import mace  # noqa: F401  (before e3nn/torch users)
import torch

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.mace.offset import e0_corrections, element_counts, refit_model_offset, refit_summary
from tiny_models import write_molecules


def model_energies(model_path, configurations) -> np.ndarray:
    """Total energies (eV) of the configurations under a saved model."""
    from protoalign_cli.mace.latents import latents_of_atoms
    from protoalign_cli.mace.models import describe_model, load_model

    model = load_model(model_path, "cpu", "float64")
    rows = latents_of_atoms(model, describe_model(model, model_path), configurations)
    return np.bincount(rows["config_index"], weights=rows["node_energy"], minlength=len(configurations))


def test_counts_and_full_rank_corrections():
    counts = element_counts([np.array([1, 1, 6]), np.array([8, 1]), np.array([6, 6, 8, 8])], [1, 6, 8])
    assert counts.tolist() == [[2, 1, 0], [1, 0, 1], [0, 2, 2]]
    truth = np.array([0.1, -0.25, 0.4])
    corrections, rank = e0_corrections(counts, counts @ truth)
    assert rank == 3 and corrections == pytest.approx(truth, abs=1e-12)


def test_one_composition_gets_the_minimum_norm_correction_and_zero_mean_residual():
    counts = element_counts([np.array([6] * 9 + [1] * 8 + [8] * 4)] * 5, [1, 6, 7, 8])
    residual = np.array([0.30, 0.32, 0.28, 0.31, 0.29])
    refit = refit_summary([1, 6, 7, 8], counts, residual)
    n = counts[0]
    assert refit.rank == 1
    assert np.array(refit.corrections) == pytest.approx(residual.mean() * n / (n @ n), abs=1e-14)
    assert refit.corrections[2] == 0.0  # no nitrogen: no correction
    assert refit.mean_residual_after == pytest.approx(0.0, abs=1e-14)
    assert refit.mae_before == pytest.approx(0.30) and refit.mae_after < 0.02


def test_the_same_least_squares_as_mace_s_estimator(tiny_model, molecules_xyz):
    """Our corrections on the pretrained tiny model equal mace's --E0s estimated ones (new E0 - foundation E0)."""
    from mace.data import KeySpecification, config_from_atoms
    from mace.data.utils import estimate_e0s_from_foundation
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_tools import default_dtype

    configurations = ase.io.read(molecules_xyz, ":")
    keys = KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    foundation = torch.load(tiny_model, map_location="cpu", weights_only=False)
    e0 = foundation.atomic_energies_fn.atomic_energies.detach().numpy().ravel()
    table = [int(z) for z in foundation.atomic_numbers]
    with default_dtype("float64"):
        new_e0s = estimate_e0s_from_foundation(foundation, dict(zip(table, e0)),
                                               [config_from_atoms(a, key_specification=keys) for a in configurations],
                                               AtomicNumberTable(table))
    residual = np.array([a.info["REF_energy"] for a in configurations]) - model_energies(tiny_model, configurations)
    ours = refit_summary(table, element_counts([a.numbers for a in configurations], table), residual)
    assert ours.corrections == pytest.approx([new_e0s[z] - e for z, e in zip(table, e0)], abs=1e-9)


def test_a_known_offset_is_removed_from_a_real_model(tiny_model, tmp_path):
    """E0s shifted by a known δ per element, labels from the unshifted model: the refit gives back −δ."""
    configurations = ase.io.read(write_molecules(tmp_path / "m.xyz", n_configs=16, seed=5), ":")
    for atoms, energy in zip(configurations, model_energies(tiny_model, configurations)):
        atoms.info["label"] = energy
    shifted = torch.load(tiny_model, map_location="cpu", weights_only=False)
    delta = torch.tensor([0.05, -0.2, 0.1, 0.3], dtype=torch.float64)
    shifted.atomic_energies_fn.atomic_energies += delta
    torch.save(shifted, tmp_path / "shifted.model")
    refit = refit_model_offset(tmp_path / "shifted.model", configurations, "label", None, tmp_path / "refit.model")
    assert refit.rank == 4 and refit.configurations == 16
    assert refit.corrections == pytest.approx((-delta).tolist(), abs=1e-9)
    assert abs(refit.mean_residual_before) > 0.1 and refit.mae_after < 1e-9
    residual = np.array([a.info["label"] for a in configurations]) - model_energies(tmp_path / "refit.model", configurations)
    assert np.abs(residual).max() < 1e-9


def test_a_constant_offset_on_one_composition_comes_back_to_zero_mean_residual(tiny_model, tmp_path):
    configurations = ase.io.read(write_molecules(tmp_path / "ch4.xyz", n_configs=6, molecules=("CH3OH",)), ":")
    for atoms, energy in zip(configurations, model_energies(tiny_model, configurations)):
        atoms.info["label"] = energy + 0.3
    refit = refit_model_offset(tiny_model, configurations, "label", None, tmp_path / "refit.model")
    assert refit.rank == 1
    residual = np.array([a.info["label"] for a in configurations]) - model_energies(tmp_path / "refit.model", configurations)
    assert residual.mean() == pytest.approx(0.0, abs=1e-10)
    assert refit.mean_residual_before == pytest.approx(0.3, abs=1e-10)


def test_no_labelled_configuration_is_an_error(tiny_model, molecules_xyz, tmp_path):
    with pytest.raises(ProtoalignError, match="at least one training configuration"):
        refit_model_offset(tiny_model, ase.io.read(molecules_xyz, ":"), "no_such_key", None, tmp_path / "x.model")
    assert not (tmp_path / "x.model").exists()
