"""The offset refit: after training, correct a model's E0s by least squares on its own training residuals.

mace's ``--E0s estimated`` fits E0 corrections to the foundation model's residuals once, before
training; nothing holds that constant afterwards (E0s are buffers, the energy term weighs 1 against
100 for forces), so a fine-tuned model's energies can drift by a constant that dominates its raw
energy error at small N. The refit solves the same least-squares problem as mace's estimator
(``mace.data.utils.estimate_e0s_from_foundation``), on the trained model:

    min_c Σ_k (E_ref,k − E_model,k − Σ_z n_k,z c_z)²      (eV²)

over the training configurations k, with n_k,z the atoms of element z (every element of the model's
table, in its order) and c_z the E0 corrections (eV), by ``numpy.linalg.lstsq(rcond=None)``: in a
rank-deficient case (one composition) it gives the minimum-norm correction, as mace's does, and the
mean training residual becomes 0. Only the head being fine-tuned is corrected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError


@dataclasses.dataclass(frozen=True)
class OffsetRefit:
    """A refit's result: ``corrections`` (eV) per element of ``atomic_numbers``, the system's ``rank``, the
    training configurations used, and their mean, MAE and RMSE residual (eV per configuration) before and after."""

    atomic_numbers: tuple[int, ...]
    corrections: tuple[float, ...]
    rank: int
    configurations: int
    mean_residual_before: float
    mean_residual_after: float
    mae_before: float
    mae_after: float
    rmse_before: float
    rmse_after: float

    def as_dict(self) -> dict:
        """JSON-ready, corrections keyed by atomic number."""
        record = dataclasses.asdict(self)
        record["corrections"] = {str(z): c for z, c in zip(self.atomic_numbers, self.corrections)}
        del record["atomic_numbers"]
        return record


def element_counts(configurations_numbers: Sequence[np.ndarray], atomic_numbers: Sequence[int]) -> np.ndarray:
    """[n_configs, n_elements] atoms of each element of ``atomic_numbers`` in each configuration."""
    table = np.asarray(atomic_numbers)
    return np.array([[np.count_nonzero(np.asarray(numbers) == z) for z in table] for numbers in configurations_numbers],
                    dtype=np.float64)


def e0_corrections(counts: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, int]:
    """Least-squares E0 corrections c (eV per atom of each element) with counts @ c ≈ residual (eV), and the rank.

    ``numpy.linalg.lstsq(rcond=None)``: the minimum-norm solution when the counts are rank-deficient.
    """
    corrections, _, rank, _ = np.linalg.lstsq(np.asarray(counts, dtype=np.float64),
                                              np.asarray(residual, dtype=np.float64), rcond=None)
    return corrections, int(rank)


def refit_summary(atomic_numbers: Sequence[int], counts: np.ndarray, residual: np.ndarray) -> OffsetRefit:
    """Solve the refit for residuals E_ref − E_model (eV per configuration) and describe it."""
    if len(residual) == 0:
        raise ProtoalignError("the offset refit needs at least one training configuration with an energy")
    corrections, rank = e0_corrections(counts, residual)
    after = residual - counts @ corrections
    return OffsetRefit(tuple(int(z) for z in atomic_numbers), tuple(float(c) for c in corrections), rank,
                       len(residual), float(residual.mean()), float(after.mean()), float(np.abs(residual).mean()),
                       float(np.abs(after).mean()), float(np.sqrt(np.mean(residual**2))), float(np.sqrt(np.mean(after**2))))


def apply_corrections(model, corrections: Sequence[float], head_index: int) -> None:
    """Add the corrections (eV, model element order) to the E0s of one head of a loaded model, in place."""
    import torch

    energies = model.atomic_energies_fn.atomic_energies
    delta = torch.as_tensor(np.asarray(corrections), dtype=energies.dtype, device=energies.device)
    with torch.no_grad():
        if energies.dim() == 1:
            energies += delta
        else:
            energies[head_index] += delta


def refit_model_offset(model_path: Path, configurations: Sequence, energy_key: str, head: str | None,
                       out: Path, device: str = "cpu") -> OffsetRefit:
    """Refit the E0s of the model at ``model_path`` on labelled ase ``configurations`` (``energy_key``, eV) and save
    the corrected model to ``out`` (written whole, then renamed)."""
    import copy

    import torch

    from protoalign_cli.io.outputs import atomic_output
    from protoalign_cli.mace.latents import latents_of_atoms
    from protoalign_cli.mace.models import PRETRAINING_HEAD, describe_model, for_inference, read_checkpoint

    labelled = [atoms for atoms in configurations if energy_key in atoms.info]
    trained = read_checkpoint(model_path, device)
    dtype = str(next(trained.parameters()).dtype).replace("torch.", "")
    model = for_inference(copy.deepcopy(trained), device, dtype)  # the saved copy keeps its training state
    info = describe_model(model, model_path)
    head = head or next(h for h in info.heads if h != PRETRAINING_HEAD)
    if head not in info.heads:
        raise ProtoalignError(f"head {head!r} is not one of the model's heads: {', '.join(info.heads)}")
    rows = latents_of_atoms(model, info, labelled, head=head, device=device)
    predicted = np.bincount(rows["config_index"], weights=rows["node_energy"], minlength=len(labelled))
    reference = np.array([float(atoms.info[energy_key]) for atoms in labelled])
    counts = element_counts([atoms.numbers for atoms in labelled], info.atomic_numbers)
    refit = refit_summary(info.atomic_numbers, counts, reference - predicted)
    apply_corrections(trained, refit.corrections, info.heads.index(head))
    with atomic_output(out, overwrite=True) as tmp:
        torch.save(trained, tmp)
    return refit



def refit_path(model: Path) -> Path:
    """Where the refit copy of a model is saved: '<stem>_refit.model' beside it."""
    return Path(model).with_name(f"{Path(model).stem}_refit.model")


def is_isolated_atom(atoms) -> bool:
    """Whether a configuration is an E0 reference (one atom, config_type IsolatedAtom), which MACE does not train on."""
    return len(atoms) == 1 and atoms.info.get("config_type") == "IsolatedAtom"


def mace_training_part(configurations: Sequence, valid_fraction: float, seed: int) -> list:
    """The configurations mace_run_train trained on when it split them with ``--valid_fraction`` (no validation
    file): the same split, by mace's own ``random_train_valid_split`` with the run's seed."""
    import tempfile

    from mace.data.utils import random_train_valid_split

    with tempfile.TemporaryDirectory() as scratch:  # mace writes the validation indices there
        train, _ = random_train_valid_split(list(range(len(configurations))), valid_fraction, seed, scratch)
    return [configurations[i] for i in train]


def refit_on_files(model: Path, train_files: Sequence[str], energy_key: str, valid_fraction: float | None,
                   seed: int) -> tuple[Path, OffsetRefit]:
    """Refit a fine-tuned model's E0s on the configurations it trained on: those of its training files (any ASE
    format; ``energy_key`` in eV) but E0 references, and of them only mace's training part when mace split
    them (``valid_fraction``, with the run's ``seed``). Save it to ``refit_path(model)``; return that path and
    the refit."""
    from protoalign_cli.io.structures import read_structures

    for path in train_files:
        if Path(path).suffix in (".h5", ".hdf5") or Path(path).is_dir():
            raise ProtoalignError(f"--refit-offset reads training files with ASE; {path} is not one (pass an extxyz)")
    configurations = [atoms for path in train_files for atoms in read_structures(Path(path), "train", [energy_key])
                      if not is_isolated_atom(atoms)]
    if valid_fraction is not None:
        configurations = mace_training_part(configurations, valid_fraction, seed)
    out = refit_path(model)
    return out, refit_model_offset(model, configurations, energy_key, None, out)
