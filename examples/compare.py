"""Compare MACE models on held-out frames: energy MAE (meV/atom) and force MAE (meV/Å), one row per model.

    python examples/compare.py examples/data/target_test.xyz \\
        --model pretrained=examples/foundation.model --model fine-tuned=run/finetune/finetuned.model \\
        [--json errors.json]

Reference labels are read from ``--energy-key`` (eV) and ``--forces-key`` (eV/Å); the models are
evaluated with mace's MACECalculator on the CPU in float64.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np


def energy_mae_per_atom(predicted, reference, n_atoms) -> float:
    """Mean over frames of |E_pred − E_ref| / n_atoms, in meV/atom (energies in eV)."""
    predicted, reference, n_atoms = (np.asarray(a, dtype=float) for a in (predicted, reference, n_atoms))
    return float(np.mean(np.abs(predicted - reference) / n_atoms) * 1000.0)


def force_mae(predicted, reference) -> float:
    """Mean over all atoms and Cartesian components of |F_pred − F_ref|, in meV/Å (forces in eV/Å)."""
    return float(np.mean(np.abs(np.asarray(predicted, dtype=float) - np.asarray(reference, dtype=float))) * 1000.0)


def model_errors(model: Path, frames: list, energy_key: str, forces_key: str) -> dict:
    """Energy MAE (meV/atom) and force MAE (meV/Å) of ``model`` on ``frames`` (ase.Atoms with reference labels)."""
    from protoalign_cli.mace.models import import_mace_quietly

    import_mace_quietly()
    from mace.calculators import MACECalculator

    with warnings.catch_warnings():  # torch.load's weights_only notice, once per model: not the user's concern
        warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
        calculator = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    energies, forces = [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    return {
        "energy_mae_mev_per_atom": energy_mae_per_atom(
            energies, [a.info[energy_key] for a in frames], [len(a) for a in frames]),
        "force_mae_mev_per_angstrom": force_mae(
            np.concatenate(forces), np.concatenate([a.arrays[forces_key] for a in frames])),
    }


def error_table(rows: dict, n_frames: int, frames_path: Path) -> str:
    """A plain-text table of ``rows`` (name -> errors and model path) on ``n_frames`` held-out frames."""
    width = max(len("model"), *(len(name) for name in rows))
    lines = [f"held-out frames: {n_frames} ({frames_path})",
             f"{'model':<{width}}  energy MAE (meV/atom)  force MAE (meV/Å)  file"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {row['energy_mae_mev_per_atom']:>21.1f}  "
                     f"{row['force_mae_mev_per_angstrom']:>17.1f}  {row['model']}")
    return "\n".join(lines)


def named_model(text: str) -> tuple[str, Path]:
    """Parse ``NAME=PATH`` into (NAME, PATH); the model file must exist."""
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"model file {path} does not exist")
    return name, Path(path).resolve()


def main(argv=None) -> None:
    """Print the error table of each ``--model`` on the frames, and write it as JSON with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frames", type=Path, help="extxyz file of held-out frames with reference labels")
    parser.add_argument("--model", type=named_model, action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--energy-key", default="REF_energy")
    parser.add_argument("--forces-key", default="REF_forces")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import ase.io

    frames = ase.io.read(args.frames, index=":")
    rows = {name: {**model_errors(path, frames, args.energy_key, args.forces_key), "model": str(path)}
            for name, path in args.model}
    if args.json:
        args.json.write_text(json.dumps({"frames": str(args.frames.resolve()), "n_frames": len(frames),
                                         "models": rows}, indent=2) + "\n")
    print(error_table(rows, len(frames), args.frames))


if __name__ == "__main__":
    main()
