"""The latent alignment term on a real tiny MACE: column mapping, zero at the pretrained model for the
'pretrained' target, the 'prototype' target against numpy, the gradient, and its bad settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mace  # noqa: F401  (before e3nn/torch users)
import torch

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.terms.base import TermBatch
from protoalign_cli.terms.latent_alignment import (
    LatentAlignmentSettings,
    LatentAlignmentTerm,
    interaction_columns,
    node_feature_columns,
    standardized,
)

LAYOUT = [{"name": "interaction_0", "kind": "interaction", "start": 0, "size": 3},
          {"name": "interaction_1", "kind": "interaction", "start": 3, "size": 2},
          {"name": "readout_0", "kind": "energy", "start": 5, "size": 1}]


def test_interaction_columns_keep_only_node_features():
    assert interaction_columns(LAYOUT, np.array([0, 2, 4, 5])).tolist() == [0, 1, 2]
    assert interaction_columns(LAYOUT, np.array([5])).tolist() == []


def test_node_feature_columns_follow_the_0e_slices():
    # node_feats: layer 0 has 0e at [0, 3) then 1o at [3, 12); layer 1 has 0e at [12, 14)
    slices = [[(0, 3)], [(12, 14)]]
    assert node_feature_columns(slices, np.array([0, 2, 3, 4])).tolist() == [0, 2, 12, 13]
    with pytest.raises(ProtoalignError, match="does not match"):
        node_feature_columns(slices, np.array([5]))


def test_standardized_uses_each_atoms_element_map():
    latent = np.array([[1.0, 2.0], [3.0, 5.0], [7.0, 7.0]])
    mean, std = np.array([[1.0, 1.0], [3.0, 1.0]]), np.array([[1.0, 2.0], [2.0, 4.0]])
    z = standardized(latent, np.array([0, 1, -1]), mean, std)
    assert z.tolist() == [[0.0, 0.5], [0.0, 1.0], [0.0, 0.0]]


@pytest.fixture(scope="module")
def tiny_setup(tiny_model, molecules_xyz, prototypes_file):
    """The tiny model, its prototypes (k = 2, every feature), the molecules' target atoms with latents,
    and one batch of all molecules with the model's output."""
    import ase.io

    from protoalign_cli.mace.latents import atoms_to_graph
    from protoalign_cli.mace.models import describe_model, load_model
    from protoalign_cli.prototypes.assignment import load_prototypes
    from protoalign_cli.terms.target_atoms import assign_configurations
    from mace.tools import torch_geometric
    from mace.tools.torch_tools import default_dtype

    prototypes = load_prototypes(prototypes_file)
    model = load_model(tiny_model, "cpu", "float64")
    info = describe_model(model, tiny_model)
    configurations = ase.io.read(molecules_xyz, ":")
    atoms = assign_configurations(model, info, prototypes, [("train", configurations)], 8, "cpu", keep_latents=True)
    with default_dtype("float64"):
        graphs = [atoms_to_graph(a, info, info.heads[0]) for a in configurations]
        batch = torch_geometric.batch.Batch.from_data_list(graphs)
        output = model(batch.to_dict(), training=False, compute_force=False)
    return model, prototypes, atoms, batch, output


def term_batch(term, batch, node_feats) -> TermBatch:
    """All target atoms in file order (the batch holds every configuration in order)."""
    return TermBatch(ref=batch, pred={"node_feats": node_feats}, element_index=batch["node_attrs"].argmax(dim=-1),
                     node_heads=torch.zeros(len(node_feats), dtype=torch.long),
                     target=torch.from_numpy(term.targets.target), weight=torch.from_numpy(term.targets.weight),
                     ddp=False)


def built(settings, setup):
    model, prototypes, atoms, _, _ = setup
    term = LatentAlignmentTerm.build(settings, atoms, prototypes)
    term.attach_model(model)
    return term


def test_pretrained_target_is_zero_at_the_pretrained_model(tiny_setup):
    _, _, atoms, batch, output = tiny_setup
    term = built(LatentAlignmentSettings(weight=1.0, target="pretrained"), tiny_setup)
    assert LatentAlignmentTerm.needs_pretrained_latents(term.settings)
    value = term.compute(term_batch(term, batch, output["node_feats"]))
    assert term.targets.weight.sum() > 0 and term.targets.target.shape[1] == 16  # 2 layers x 8x0e
    assert value.term.item() == pytest.approx(0.0, abs=1e-24)
    moved = output["node_feats"] + 0.1
    assert term.compute(term_batch(term, batch, moved)).term.item() > 1e-6


def test_prototype_target_matches_numpy(tiny_setup):
    _, prototypes, atoms, batch, output = tiny_setup
    settings = LatentAlignmentSettings(weight=1.0, weighting="hard", cutoff=2.0)
    term = built(settings, tiny_setup)
    assert not LatentAlignmentTerm.needs_pretrained_latents(settings)
    ids = atoms.assignment.prototype_id
    sub = interaction_columns(prototypes.layout, prototypes.columns)
    rows = np.searchsorted(prototypes.elements, atoms.atomic_numbers)
    z = (atoms.latent[:, prototypes.columns[sub]] - prototypes.feature_mean[rows][:, sub]) / prototypes.feature_std[rows][:, sub]
    square = ((z - prototypes.centroid[ids][:, sub]) ** 2).mean(axis=1)
    weight = (atoms.assignment.distance <= 2.0 * prototypes.radius[ids]).astype(float)
    expected = (weight * square).sum() / weight.sum()
    value = term.compute(term_batch(term, batch, output["node_feats"]))
    assert value.term.item() == pytest.approx(expected, rel=1e-10)
    assert value.sums["weight_sum"].item() == pytest.approx(weight.sum())
    assert term.summarize({"weighted_square_sum": expected * 3.0, "weight_sum": 3.0}) == {"latent": expected, "weight": 3.0}


@pytest.mark.parametrize("target", ["prototype", "pretrained"])
def test_gradient_matches_finite_differences(tiny_setup, target):
    _, _, _, batch, output = tiny_setup
    term = built(LatentAlignmentSettings(weight=1.0, target=target), tiny_setup)
    feats = (output["node_feats"].detach() + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: term.compute(term_batch(term, batch, f)).term, (feats,), eps=1e-6,
                                    atol=1e-8)


@pytest.mark.parametrize("change, pattern", [
    ({"target": "centroid"}, "--latent-target must be one of prototype, pretrained"),
    ({"weighting": "box"}, "--latent-weighting must be one of"),
    ({"cutoff": 0.0}, "--latent-cutoff must be > 0"),
    ({"spread_scale": -1.0}, "--latent-spread-scale must be > 0"),
    ({"weight": -1.0}, "--latent-weight must be a finite number >= 0"),
])
def test_bad_settings_name_the_option(change, pattern):
    with pytest.raises(ProtoalignError, match=pattern):
        LatentAlignmentTerm.check_settings(dataclasses.replace(LatentAlignmentSettings(), **change))


def test_energy_only_prototypes_are_refused(tiny_setup):
    _, prototypes, atoms, _, _ = tiny_setup
    energy_only = dataclasses.replace(prototypes, columns=np.array([16, 17]))
    with pytest.raises(ProtoalignError, match="--features energy"):
        LatentAlignmentTerm.build(LatentAlignmentSettings(weight=1.0), atoms, energy_only)
