"""Errors of a finished run's model on the test and validation sets (float64; the model is loaded once),
and the offset metrics derived from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from protoalign_cli.bench.layout import DONE, final_model, read_done
from protoalign_cli.bench.stats import error_metrics, valid_shifted_energy_mae
from protoalign_cli.io.outputs import atomic_output

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig
    from protoalign_cli.bench.layout import BenchLayout, Run

SHIFTED_METRICS = ("energy_mean_error_mev", "energy_mae_valid_shifted_mev", "valid_energy_mae_shifted_mev")


def calculator(model_path: Path, device: str):
    """A float64 MACECalculator; for multi-head models the fine-tuned 'Default' head."""
    import warnings

    import mace  # noqa: F401
    import torch
    from mace.calculators import MACECalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = getattr(torch.load(model_path, map_location="cpu", weights_only=False), "heads", None) or ["Default"]
        head = "Default" if "Default" in heads else heads[0]
        return MACECalculator(model_paths=str(model_path), device=device, default_dtype="float64", head=head)


def errors_on(model, atoms_list: Sequence, energy_key: str, forces_key: str) -> dict:
    """Errors of a calculator on labelled structures: see ``error_metrics``; plus the per-configuration
    energy errors (meV, ``energy_errors_mev``) and their mean (``energy_mean_error_mev``)."""
    energies, ref_energies, n_atoms, forces, ref_forces = [], [], [], [], []
    for atoms in atoms_list:
        ref_energies.append(atoms.info[energy_key])
        ref_forces.append(atoms.arrays[forces_key])
        atoms = atoms.copy()
        atoms.calc = model
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        n_atoms.append(len(atoms))
    errors = 1000.0 * (np.array(energies) - np.array(ref_energies))
    return {**error_metrics(np.array(energies), np.array(ref_energies), np.array(n_atoms),
                            np.concatenate(forces), np.concatenate(ref_forces)),
            "energy_mean_error_mev": float(np.mean(errors)), "energy_errors_mev": errors.tolist()}


def evaluate_model(config: BenchConfig, layout: BenchLayout, model_path: Path) -> tuple[dict, dict]:
    """Errors (``errors_on``) of a model on the bench's test set and validation set, loading it once."""
    import ase.io

    model = calculator(model_path, config.device)
    return tuple(errors_on(model, ase.io.read(path, ":"), config.energy_key, config.forces_key)
                 for path in (layout.test_file, layout.valid_file))


def shifted_metrics(test: dict, valid: dict) -> dict:
    """The offset metrics of a run from its test and validation errors (``errors_on``), in meV: the
    test energy MAE after removing the mean validation error, and the validation MAE after removing
    its own mean (what ``select ... by: valid_energy_mae_shifted_mev`` compares)."""
    return {"energy_mean_error_mev": test["energy_mean_error_mev"],
            "energy_mae_valid_shifted_mev": valid_shifted_energy_mae(test["energy_errors_mev"], valid["energy_errors_mev"]),
            "valid_energy_mae_shifted_mev": valid_shifted_energy_mae(valid["energy_errors_mev"], valid["energy_errors_mev"])}


def complete_metrics(config: BenchConfig, layout: BenchLayout, run: Run, say=print) -> None:
    """Add metrics newer than a finished run's done.json by evaluating its model again (training is never redone)."""
    path = layout.run_dir(run) / DONE
    done = read_done(path)
    if done is None or all(key in done for key in SHIFTED_METRICS):
        return
    origin = Path(done["reused_from"]) / "runs" / done.get("reused_run", f"{run.method}/{run.key}") \
        if "reused_from" in done else layout.run_dir(run)
    model_path = final_model(origin)
    if not model_path.is_file():
        say(f"{run.label}: {model_path} is gone; its newer metrics stay empty")
        return
    say(f"{run.label}: evaluating again for the validation-shifted energy MAE")
    done.update(shifted_metrics(*evaluate_model(config, layout, model_path)))
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(done, indent=2) + "\n")


def refit_offset(config: BenchConfig, train_file: Path, model_path: Path, out: Path) -> dict:
    """Refit a trained model's E0s on its training split (``protoalign_cli.mace.offset``); the refit's record.

    ``config`` gives the energy key and the device (a BenchConfig, or tune's settings)."""
    import ase.io

    from protoalign_cli.mace.offset import refit_model_offset

    refit = refit_model_offset(model_path, ase.io.read(train_file, ":"), config.energy_key, None, out,
                               device=config.device)
    return refit.as_dict()
