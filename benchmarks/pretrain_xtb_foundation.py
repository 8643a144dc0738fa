"""Pretrain the setting-2 foundation model of issue 5: a MACE on the GFN2-xTB labels of five small molecules.

Setting 2 is the paper's rMD17-style same-level experiment: a model pretrained on benzene, ethanol,
malonaldehyde, toluene and uracil (../shared/data/md17-xtb, GFN2-xTB energies and forces) is then
fine-tuned on the xTB labels of aspirin, salicylic acid and naphthalene (benchmarks/configs/*_xtb*.yaml).

Split per molecule, time-separated (frames are 10 fs MD snapshots): training frames 0-599, every
``--train-stride``-th; validation frames 640-799, every 4th. The architecture copies the ANI-CC
foundation model of setting 1 (ScaleShiftMACE, 2 interactions, 64x0e, max_L 0, correlation 3,
r_max 5 Å) so that both settings fine-tune the same kind of model.

    python benchmarks/pretrain_xtb_foundation.py --out bench_runs/xtb_foundation --epochs 40

Writes OUT/train.xyz, OUT/valid.xyz, OUT/mace/ (mace_run_train's folders) and OUT/xtb_small.model,
plus OUT/pretrain.json (command, wall time, validation errors).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
SOURCES = ("benzene", "ethanol", "malonaldehyde", "toluene", "uracil")


def write_split(out: Path, train_stride: int) -> tuple[Path, Path]:
    """Write the time-separated training and validation extxyz files of the five source molecules."""
    import ase.io

    train, valid = [], []
    for name in SOURCES:
        frames = ase.io.read(SHARED / "data" / "md17-xtb" / f"{name}.xyz", index=":")
        train += frames[0:600:train_stride]
        valid += frames[640:800:4]
    train_path, valid_path = out / "train.xyz", out / "valid.xyz"
    ase.io.write(train_path, train, format="extxyz")
    ase.io.write(valid_path, valid, format="extxyz")
    return train_path, valid_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train-stride", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.out / "xtb_small.model").exists():
        sys.exit(f"{args.out / 'xtb_small.model'} exists; remove it to pretrain again")
    args.out.mkdir(parents=True, exist_ok=True)
    train_path, valid_path = write_split(args.out, args.train_stride)
    command = [
        shutil.which("mace_run_train") or "mace_run_train",
        "--name", "xtb_small", "--seed", str(args.seed), "--device", "cpu", "--default_dtype", "float32",
        "--train_file", str(train_path), "--valid_file", str(valid_path),
        "--energy_key", "xtb_energy", "--forces_key", "xtb_forces", "--E0s", "average",
        "--model", "MACE", "--num_interactions", "2", "--hidden_irreps", "64x0e", "--max_L", "0",
        "--correlation", "3", "--r_max", "5.0", "--num_radial_basis", "8", "--num_cutoff_basis", "5",
        "--batch_size", "10", "--valid_batch_size", "20", "--max_num_epochs", str(args.epochs),
        "--lr", "0.01", "--scheduler_patience", "5", "--patience", "15", "--ema", "--ema_decay", "0.99",
        "--energy_weight", "1", "--forces_weight", "100", "--error_table", "PerAtomMAE",
        "--work_dir", str(args.out / "mace"),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    shutil.copyfile(args.out / "mace" / "xtb_small.model", args.out / "xtb_small.model")
    record = {"command": command, "wall_time_s": round(wall, 1), "machine": platform.processor() or platform.machine(),
              "train_configs": sum(1 for _ in open(train_path) if "Properties=" in _),
              "valid_configs": sum(1 for _ in open(valid_path) if "Properties=" in _)}
    (args.out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
