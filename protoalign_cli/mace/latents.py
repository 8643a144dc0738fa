"""Per-atom latents of a MACE model by forward hooks on its readouts (the rows of a latent file).

A row is the 0e node features after each interaction block, then each readout's energy
contribution after scale (and the pair repulsion's, when the model has one); see docs/schema.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io import schema
from protoalign_cli.mace.models import (
    ModelInfo,
    default_dtype,
    has_pair_repulsion,
    import_mace_quietly,
    scalar_slices,
    scale_and_shift,
)

DEFAULT_BATCH_SIZE = 32  # configurations per model evaluation


class ReadoutCapture:
    """Forward hooks that keep the last output of every readout block ([n_atoms, n_heads]).

    For models with pair repulsion, ``pair`` keeps the per-atom pair energy ([n_atoms]).
    """

    def __init__(self, model):
        self.outputs: list = [None] * len(model.readouts)
        self.pair = None
        self._handles = [
            readout.register_forward_hook(self._hook(k)) for k, readout in enumerate(model.readouts)
        ]
        if has_pair_repulsion(model):
            self._handles.append(model.pair_repulsion_fn.register_forward_hook(self._hook("pair")))

    def _hook(self, k):
        def keep(_module, _inputs, output):
            if k == "pair":
                self.pair = output
            else:
                self.outputs[k] = output

        return keep

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()


def atoms_to_graph(atoms, info: ModelInfo, head: str):
    """Convert an ase.Atoms into MACE's AtomicData for the given model and head (default dtype)."""
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable

    config = mace_data.config_from_atoms(atoms, key_specification=mace_data.KeySpecification(), head_name=head)
    z_table = AtomicNumberTable(list(info.atomic_numbers))
    return mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=info.r_max, heads=list(info.heads))


def batch_latents(model, batch, capture: ReadoutCapture, slices) -> dict[str, np.ndarray]:
    """Run the model on a collated batch and return per-atom rows (latent, energies in eV, Z).

    ``slices`` are the 0e column ranges of ``node_feats`` per interaction block (``scalar_slices``).
    """
    import torch

    output = model(batch.to_dict(), training=False, compute_force=False)
    n_atoms = batch["positions"].shape[0]
    atoms_arange = torch.arange(n_atoms, device=batch["positions"].device)
    node_heads = batch["head"][batch["batch"]] if "head" in batch else torch.zeros_like(atoms_arange)
    scale, shift = scale_and_shift(model, node_heads)
    node_feats = output["node_feats"]
    columns = [node_feats[:, start:stop] for layer in slices for start, stop in layer]
    if capture.pair is not None:
        columns.append((scale * capture.pair)[:, None])
    for readout_output in capture.outputs:
        columns.append((scale * readout_output[atoms_arange, node_heads])[:, None])
    node_e0 = model.atomic_energies_fn(batch["node_attrs"])[atoms_arange, node_heads]
    node_energy = output["node_energy"].double()
    return {
        schema.LATENT: torch.cat(columns, dim=1).detach().cpu().numpy(),
        schema.NODE_ENERGY: node_energy.detach().cpu().numpy(),
        schema.ENERGY_MINUS_E0: (node_energy - node_e0.double()).detach().cpu().numpy(),
    }


def rows_for_atoms(model, capture, slices, info, head, atoms_list, device, torch_geometric) -> dict[str, np.ndarray]:
    graphs = [atoms_to_graph(atoms, info, head) for atoms in atoms_list]
    batch = torch_geometric.batch.Batch.from_data_list(graphs).to(device)
    rows = batch_latents(model, batch, capture, slices)
    rows[schema.ATOMIC_NUMBER] = np.concatenate([atoms.numbers for atoms in atoms_list]).astype(np.int32)
    rows[schema.ATOM_INDEX] = np.concatenate([np.arange(len(a)) for a in atoms_list]).astype(np.int32)
    return rows


def latents_of_atoms(model, info: ModelInfo, atoms_list: Sequence, head: str | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu") -> dict[str, np.ndarray]:
    """In-memory latents of a list of ase.Atoms under a loaded model (see ``load_model``).

    Returns the per-atom arrays of the latent file schema (``latent``, ``node_energy`` and
    ``energy_minus_e0`` in eV, ``atomic_number``, ``atom_index``) plus ``config_index``
    (position in ``atoms_list``). Used by finetune and diagnose for target structures.
    """
    import_mace_quietly()
    import torch
    from mace.tools import torch_geometric

    if batch_size < 1:
        raise ProtoalignError(f"the batch size must be >= 1, got {batch_size}")
    head = head or info.heads[0]
    if head not in info.heads:
        raise ProtoalignError(f"head {head!r} is not one of the model's heads: {', '.join(info.heads)}")
    known = set(info.atomic_numbers)
    for i, atoms in enumerate(atoms_list):
        unknown = set(int(z) for z in atoms.numbers) - known
        if unknown:
            raise ProtoalignError(f"configuration {i}: atomic number(s) {sorted(unknown)} not in the model")
    if not atoms_list:
        return _empty_rows(info)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    slices = scalar_slices(model)
    capture = ReadoutCapture(model)
    parts = []
    try:
        with default_dtype(dtype), torch.no_grad():
            for start in range(0, len(atoms_list), batch_size):
                chunk = list(atoms_list[start:start + batch_size])
                rows = rows_for_atoms(model, capture, slices, info, head, chunk, device, torch_geometric)
                rows[schema.CONFIG_INDEX] = np.concatenate(
                    [np.full(len(a), start + i, dtype=np.int64) for i, a in enumerate(chunk)]
                )
                parts.append(rows)
    finally:
        capture.remove()
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _empty_rows(info: ModelInfo) -> dict[str, np.ndarray]:
    rows = {name: np.zeros(0, dtype=dtype) for name, dtype in schema.PER_ATOM_DATASETS.items()
            if name != schema.SOURCE_FILE_INDEX}
    rows[schema.LATENT] = np.zeros((0, info.latent_dim))
    return rows
