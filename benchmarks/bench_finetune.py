"""Benchmark ``protoalign finetune`` against plain ``mace_run_train`` with the same arguments (CPU).

Model: ANI-CC (../shared/models/ani500k_small_CC.model). Target: N aspirin configurations sampled
with a seed from frames 0-399 of ../shared/data/md17-pbe/aspirin.xyz, validation frames 400-479.
Prototypes: built once (not timed as part of fine-tuning) from every 10th frame of the five
small source molecules of ../shared/data/md17-xtb, unless --prototypes is given.

Plain and aligned runs alternate (plain, aligned, plain, aligned, ...), each a fresh process with
identical mace_run_train arguments. An epoch's wall time is the interval between MACE's
consecutive "Epoch E:" log lines (training + validation + checkpoint; the aligned side also
builds per-batch targets, computes the term and logs it); the first epoch is left out (warm-up).
Reported: the ratio of pooled median epoch times, the ratio within each back-to-back pair (less
sensitive to a machine whose load drifts), and the share of each aligned epoch spent inside the
term itself (timed by protoalign, forward part; its backward is a few elementwise operations).
The one-time assignment (pretrained-model pass over the target data + nearest-prototype search)
is reported separately, from protoalign's run record.

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py --n-train 50 --epochs 5 --repeats 2 --out bench_out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "ani500k_small_CC.model"
SOURCES = ("benzene", "ethanol", "malonaldehyde", "toluene", "uracil")


def write_data(out: Path, n_train: int, seed: int) -> tuple[Path, Path, Path]:
    """Training subset, validation frames and source geometries, written as extxyz into ``out``."""
    import ase.io
    import numpy as np

    aspirin = SHARED / "data" / "md17-pbe" / "aspirin.xyz"
    pool = ase.io.read(aspirin, index="0:400")
    chosen = sorted(np.random.default_rng(seed).choice(len(pool), n_train, replace=False))
    train, valid, source = out / f"train{n_train}.xyz", out / "valid.xyz", out / "source.xyz"
    ase.io.write(train, [pool[i] for i in chosen])
    ase.io.write(valid, ase.io.read(aspirin, index="400:480"))
    frames = [a for name in SOURCES for a in ase.io.read(SHARED / "data" / "md17-xtb" / f"{name}.xyz", index="::10")]
    ase.io.write(source, frames)
    return train, valid, source


def build_prototypes(out: Path, source: Path) -> Path:
    """``protoalign extract`` + ``protoalign prototypes`` (default options) over the source geometries."""
    latents, prototypes = out / "source_latents.h5", out / "prototypes.h5"
    protoalign = [sys.executable, "-m", "protoalign_cli.cli"]
    subprocess.run([*protoalign, "extract", "--model", str(MODEL), "--configs", str(source), "--out", str(latents),
                    "--overwrite"], check=True)
    subprocess.run([*protoalign, "prototypes", str(latents), "--out", str(prototypes), "--overwrite"], check=True)
    return prototypes


def mace_args(work_dir: Path, train: Path, valid: Path, epochs: int, batch_size: int) -> list[str]:
    """Identical mace_run_train arguments for both sides."""
    return [
        "--name", "bench", "--seed", "3", "--work_dir", str(work_dir), "--foundation_model", str(MODEL),
        "--train_file", str(train), "--valid_file", str(valid), "--energy_key", "REF_energy",
        "--forces_key", "REF_forces", "--E0s", "estimated", "--multiheads_finetuning", "False",
        "--max_num_epochs", str(epochs), "--batch_size", str(batch_size), "--valid_batch_size", "20",
        "--lr", "0.001", "--default_dtype", "float64", "--device", "cpu", "--eval_interval", "1", "--plot", "False",
    ]


def epoch_seconds(log: Path) -> list[float]:
    """Wall seconds between consecutive 'Epoch E:' lines of a MACE log (epochs 1, 2, ...)."""
    stamps = []
    for line in log.read_text().splitlines():
        if " INFO: Epoch " in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")
            stamps.append(stamp.timestamp())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def step_seconds(results: Path) -> list[float]:
    """Per-optimizer-step wall times MACE records (mode 'opt'), without the first epoch."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return [row["time"] for row in rows if row.get("mode") == "opt" and row.get("epoch", 0) > 0]


def run_side(kind: str, work_dir: Path, args: list[str], prototypes: Path, align_weight: float) -> dict:
    """One plain or aligned run in a fresh process; its epoch and step times."""
    if kind == "plain":
        command = [sys.executable, "-c", "from mace.cli.run_train import main; main()", *args]
    else:
        command = [sys.executable, "-m", "protoalign_cli.cli", "finetune", "--prototypes", str(prototypes),
                   "--align-weight", str(align_weight), "--", *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    side = {"kind": kind, "wall_seconds": wall,
            "epoch_seconds": epoch_seconds(work_dir / "logs" / "bench_run-3.log"),
            "step_seconds": step_seconds(work_dir / "results" / "bench_run-3_train.txt")}
    if kind == "aligned":
        record = json.loads((work_dir / "protoalign_finetune.json").read_text())
        side["assignment_seconds"] = record["results"]["assignment_seconds"]
        side["assignment"] = record["results"]["assignment"]["all"]
        side["term_seconds"] = term_seconds(work_dir / "protoalign" / "align_bench_run-3.jsonl")
    return side


def term_seconds(jsonl: Path) -> list[float]:
    """Per epoch (1, 2, ...): wall seconds spent in the alignment term, training plus validation."""
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    epochs = [r for r in lines if "event" not in r and not r["initial"] and r["epoch"] > 0]
    return [r["train"]["seconds"] + sum(v["seconds"] for v in r.get("valid", {}).values()) for r in epochs]


def cpu_model() -> str:
    """The CPU model name (as lscpu shows it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="plain/aligned pairs, alternating")
    parser.add_argument("--align-weight", type=float, default=0.1)
    parser.add_argument("--prototypes", type=Path, default=None, help="reuse a prototype file of ANI-CC")
    parser.add_argument("--seed", type=int, default=0, help="choice of the training configurations")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()

    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, valid, source = write_data(out, options.n_train, options.seed)
    prototypes = options.prototypes or build_prototypes(out, source)
    sides = []
    for repeat in range(options.repeats):
        for kind in ("plain", "aligned"):
            work_dir = out / f"{kind}_{repeat}"
            if work_dir.exists():
                raise SystemExit(f"{work_dir} exists; use a fresh --out")
            args = mace_args(work_dir, train, valid, options.epochs, options.batch_size)
            sides.append(run_side(kind, work_dir, args, prototypes, options.align_weight))
            print(f"{kind} {repeat}: epochs {['%.2f' % s for s in sides[-1]['epoch_seconds']]} s", flush=True)

    def pooled(kind: str, key: str) -> list[float]:
        return [t for side in sides if side["kind"] == kind for t in side[key]]

    pairs = list(zip(sides[0::2], sides[1::2]))  # (plain, aligned) run back to back
    pair_ratios = [statistics.median(a["epoch_seconds"]) / statistics.median(p["epoch_seconds"]) for p, a in pairs]
    term_shares = [t / e for a in sides[1::2] for t, e in zip(a["term_seconds"], a["epoch_seconds"])]
    summary = {
        "command": " ".join(["python", "benchmarks/bench_finetune.py", *sys.argv[1:]]),
        "machine": cpu_model(), "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": os.getloadavg(),
        "n_train": options.n_train, "epochs": options.epochs, "batch_size": options.batch_size,
        "repeats": options.repeats, "align_weight": options.align_weight,
        "median_epoch_seconds": {k: statistics.median(pooled(k, "epoch_seconds")) for k in ("plain", "aligned")},
        "median_step_seconds": {k: statistics.median(pooled(k, "step_seconds")) for k in ("plain", "aligned")},
        "pair_epoch_ratios": pair_ratios,
        "median_term_share_of_epoch": statistics.median(term_shares),
        "assignment_seconds": [s["assignment_seconds"] for s in sides if s["kind"] == "aligned"],
        "sides": sides,
    }
    summary["epoch_ratio"] = summary["median_epoch_seconds"]["aligned"] / summary["median_epoch_seconds"]["plain"]
    summary["step_ratio"] = summary["median_step_seconds"]["aligned"] / summary["median_step_seconds"]["plain"]
    (out / "bench_finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"median epoch: plain {summary['median_epoch_seconds']['plain']:.2f} s, aligned "
          f"{summary['median_epoch_seconds']['aligned']:.2f} s, ratio {summary['epoch_ratio']:.3f}")
    print(f"median optimizer step: ratio {summary['step_ratio']:.3f}; per back-to-back pair, epoch ratio "
          f"{', '.join('%.3f' % r for r in pair_ratios)}")
    print(f"time spent in the alignment term: median {100 * summary['median_term_share_of_epoch']:.2f} % of an epoch")
    print(f"one-time assignment: {', '.join('%.1f s' % s for s in summary['assignment_seconds'])} "
          f"(computed afresh in each aligned run, each has its own work folder)")


if __name__ == "__main__":
    main()
