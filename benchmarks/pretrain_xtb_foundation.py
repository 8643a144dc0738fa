"""Pretrain the setting-2 foundation model of issue 5: a MACE on the GFN2-xTB labels of five small molecules.

Setting 2 is the paper's rMD17-style same-level experiment: a model pretrained on benzene, ethanol,
malonaldehyde, toluene and uracil (../shared/data/md17-xtb, GFN2-xTB energies and forces) is then
fine-tuned on the xTB labels of aspirin, salicylic acid and naphthalene (benchmarks/configs/*_xtb*.yaml).

Split per molecule, time-separated (frames are 10 fs MD snapshots): training frames 0-599, every
``--train-stride``-th; validation frames 640-799, every 4th. The architecture copies the ANI-CC
foundation model of setting 1 (ScaleShiftMACE, 2 interactions, 64x0e, max_L 0, correlation 3,
r_max 5 Å) so that both settings fine-tune the same kind of model.

    python benchmarks/pretrain_xtb_foundation.py --out bench_runs/xtb_foundation --epochs 40 --train-stride 2 --stage-two-epochs 15

Stage one trains from scratch with MACE's default weights (energy 1, forces 100); it leaves the
energies poor (24 meV/atom validation MAE after 40 epochs). ``--stage-two-epochs S`` then fine-tunes
that model on the same data with energy weight 1000 and lr 1e-3 for S epochs (MACE's own
foundation-model path; its ``--swa`` stage two cannot be added by ``--restart_latest`` in mace-torch
0.3.16: KeyError 'swa_lr'). A finished stage (its model file exists) is not run again.

Writes OUT/train.xyz, OUT/valid.xyz, OUT/mace/ and OUT/mace_stage2/ (mace_run_train's folders),
OUT/xtb_small_stage1.model and OUT/xtb_small.model (the final model), plus OUT/pretrain.json
(commands and wall times).
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


def run_stage(command: list[str], trained: Path, model: Path) -> float:
    """Run one mace_run_train stage unless ``model`` exists; copy its ``trained`` model there; wall time (s)."""
    if model.exists():
        return 0.0
    start = time.perf_counter()
    subprocess.run(command, check=True)
    shutil.copyfile(trained, model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train-stride", type=int, default=1)
    parser.add_argument("--stage-two-epochs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    final = args.out / "xtb_small.model"
    if final.exists():
        sys.exit(f"{final} exists; remove it to pretrain again")
    args.out.mkdir(parents=True, exist_ok=True)
    train_path, valid_path = write_split(args.out, args.train_stride)
    mace_run_train = shutil.which("mace_run_train") or "mace_run_train"
    data = ["--seed", str(args.seed), "--device", "cpu", "--default_dtype", "float32",
            "--train_file", str(train_path), "--valid_file", str(valid_path),
            "--energy_key", "xtb_energy", "--forces_key", "xtb_forces",
            "--batch_size", "10", "--valid_batch_size", "20", "--ema", "--ema_decay", "0.99",
            "--error_table", "PerAtomMAE"]
    stage_one = [
        mace_run_train, "--name", "xtb_small", *data, "--E0s", "average",
        "--model", "MACE", "--num_interactions", "2", "--hidden_irreps", "64x0e", "--max_L", "0",
        "--correlation", "3", "--r_max", "5.0", "--num_radial_basis", "8", "--num_cutoff_basis", "5",
        "--max_num_epochs", str(args.epochs), "--lr", "0.01", "--scheduler_patience", "5", "--patience", "15",
        "--energy_weight", "1", "--forces_weight", "100", "--work_dir", str(args.out / "mace"),
    ]
    stage_one_model = args.out / "xtb_small_stage1.model"
    record = {"stage_one": {"command": stage_one,
                            "wall_time_s": round(run_stage(stage_one, args.out / "mace" / "xtb_small.model", stage_one_model), 1)}}
    if args.stage_two_epochs:
        stage_two = [
            mace_run_train, "--name", "xtb_small_stage2", *data, "--E0s", "foundation",
            "--foundation_model", str(stage_one_model), "--multiheads_finetuning", "False",
            "--max_num_epochs", str(args.stage_two_epochs), "--lr", "0.001", "--scheduler_patience", "3",
            "--energy_weight", "1000", "--forces_weight", "100", "--work_dir", str(args.out / "mace_stage2"),
        ]
        wall = run_stage(stage_two, args.out / "mace_stage2" / "xtb_small_stage2.model", final)
        record["stage_two"] = {"command": stage_two, "wall_time_s": round(wall, 1)}
    else:
        shutil.copyfile(stage_one_model, final)
    record.update(machine=platform.processor() or platform.machine(),
                  train_configs=sum(1 for line in open(train_path) if "Properties=" in line),
                  valid_configs=sum(1 for line in open(valid_path) if "Properties=" in line))
    (args.out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
