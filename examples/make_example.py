"""Make the bundled quickstart example from scratch, offline (a few minutes on one CPU core).

Writes, next to this script:
  data/source.xyz        rattled small H/C/N/O molecules (the "source domain" of the foundation model)
  data/target_train.xyz  rattled ethanol, acetic acid, acetaldehyde (the "target domain"): fine-tune on these,
  data/target_valid.xyz  ... validate the fine-tuning on these (mace's --valid_file),
  data/target_test.xyz   ... and compare pretrained and fine-tuned models on these held-out frames
  foundation.model       a tiny ScaleShiftMACE trained by ``mace_run_train`` on source.xyz

Energies and forces come from ASE's EMT calculator (a toy potential, good enough to exercise the
pipeline); REF_energy adds fixed isolated-atom energies E0 so that totals look like DFT totals.
The target frames are independent rattles, split in order into train / valid / test (each split holds
all three molecules). Everything is seeded: rerunning gives the same structure files and, up to
floating-point non-determinism of training, the same model.

    python examples/make_example.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
E0 = {1: -13.6, 6: -1029.8, 7: -1484.9, 8: -2041.8}  # eV, isolated-atom energies added to EMT
SOURCE_MOLECULES = ("CH4", "H2O", "NH3", "CH3OH", "C2H6", "HCOOH", "CH3CN", "H2CO", "C2H4", "HCN", "H3CNH2", "CO2")
# three compositions (C2H6O, C2H4O2, C2H4O) so that mace's least-squares E0 estimate is well posed
TARGET_MOLECULES = ("CH3CH2OH", "CH3COOH", "CH3CHO")
TARGET_SPLIT = (("train", 48), ("valid", 12), ("test", 30))  # frames per split, taken in order
# the foundation learns energies as well as forces (mace's default energy weight of 1 against 100 for the
# forces left a model whose energies were off by ~300 meV/atom on its own data); EMA steadies its training
FOUNDATION_RECIPE = ("--lr", "0.01", "--energy_weight", "30", "--forces_weight", "100", "--ema", "--ema_decay", "0.99")
FOUNDATION_EPOCHS = 40


def labelled_frames(molecules, n_configs: int, rattle: float, seed: int) -> list:
    """Rattled copies of ase.build molecules with EMT REF_energy (eV, + sum of E0) and REF_forces (eV/Å)."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_configs):
        atoms = molecule(molecules[i % len(molecules)])
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        atoms.center(vacuum=5.0)
        atoms.pbc = False
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        atoms.info["REF_energy"] = energy + sum(E0[int(z)] for z in atoms.numbers)
        atoms.arrays["REF_forces"] = forces
        frames.append(atoms)
    return frames


def split_in_order(frames: list, sizes) -> dict:
    """Consecutive slices of ``frames``: ``sizes`` is ((name, count), ...); returns {name: frames}."""
    splits, start = {}, 0
    for name, count in sizes:
        splits[name] = frames[start:start + count]
        start += count
    return splits


def write_data(data_dir: Path) -> tuple[Path, list[Path]]:
    """Write source.xyz (240 configurations) and target_{train,valid,test}.xyz (48, 12 and 30 configurations)."""
    import ase.io

    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir / "source.xyz"
    ase.io.write(source, labelled_frames(SOURCE_MOLECULES, 240, rattle=0.08, seed=0), format="extxyz")
    n_target = sum(count for _, count in TARGET_SPLIT)
    splits = split_in_order(labelled_frames(TARGET_MOLECULES, n_target, rattle=0.08, seed=1), TARGET_SPLIT)
    targets = []
    for name, frames in splits.items():
        targets.append(data_dir / f"target_{name}.xyz")
        ase.io.write(targets[-1], frames, format="extxyz")
    return source, targets


def train_foundation(source: Path, model_out: Path, epochs: int) -> None:
    """Train a tiny ScaleShiftMACE on ``source`` with mace_run_train (CPU, float64) and copy it to ``model_out``."""
    e0s = "{" + ", ".join(f"{z}: {e}" for z, e in E0.items()) + "}"
    with tempfile.TemporaryDirectory(prefix="protoalign_example_") as work:
        command = [
            shutil.which("mace_run_train") or "mace_run_train",
            "--name", "foundation", "--work_dir", work, "--seed", "0",
            "--train_file", str(source), "--valid_fraction", "0.1",
            "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--E0s", e0s,
            "--model", "ScaleShiftMACE", "--hidden_irreps", "16x0e", "--r_max", "4.0", "--num_interactions", "2",
            "--max_ell", "2", "--correlation", "2", "--MLP_irreps", "8x0e",
            "--batch_size", "8", "--valid_batch_size", "16", *FOUNDATION_RECIPE, "--max_num_epochs", str(epochs),
            "--default_dtype", "float64", "--device", "cpu", "--eval_interval", "1", "--plot", "False",
        ]
        subprocess.run(command, check=True, cwd=work)
        shutil.copy(Path(work) / "foundation.model", model_out)


def main() -> None:
    """Write the structure files, train the foundation model, and print the size of each file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=FOUNDATION_EPOCHS,
                        help="Training epochs of the tiny foundation model.")
    args = parser.parse_args()
    source, targets = write_data(HERE / "data")
    train_foundation(source, HERE / "foundation.model", args.epochs)
    for path in (source, *targets, HERE / "foundation.model"):
        print(f"{path.relative_to(HERE.parent)}: {path.stat().st_size / 1024:.0f} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
