"""Issue 14's shared-data comparison: `protoalign tune` on three draws of 25 aspirin configurations against plain
mace_run_train with the short and the converged recipe on the same draws, all evaluated on the same test frames.

    protoalign bench benchmarks/configs/aspirin_anicc_tune_compare.yaml --out bench_runs/aspirin_anicc_tune_compare --jobs 2
    python benchmarks/compare_tune.py --bench-out bench_runs/aspirin_anicc_tune_compare --tune-root bench_runs/tune_aspirin

Runs `protoalign tune` (resumable) on each draw's training file (splits/N25_seed<s>/train.xyz of the bench folder),
with the default candidates, --valid-fraction 0.2 --order-key frame (the draw is in random order; validation is its
5 latest frames in time) and --max-epochs E (a bounded recipe for a CPU), then evaluates
each best.model on the bench's test frames (float64) and prints the paired table (Markdown) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np


def tune_draw(foundation: Path, train: Path, out: Path, max_epochs: int, jobs: int) -> None:
    """Run (or resume) protoalign tune on one draw."""
    subprocess.run(["protoalign", "tune", "--foundation-model", str(foundation), "--train", str(train),
                    "--valid-fraction", "0.2", "--order-key", "frame", "--max-epochs", str(max_epochs), "--jobs", str(jobs),
                    "--out", str(out)], check=True)


def test_errors(model: Path, test_file: Path) -> dict:
    """Energy MAE (meV per configuration) and force MAE (meV/Å) of a model on the test frames."""
    import ase.io

    from protoalign_cli.bench.evaluate import calculator, errors_on

    errors = errors_on(calculator(model, "cpu"), ase.io.read(test_file, ":"), "REF_energy", "REF_forces")
    return {"energy_mae_mev": errors["energy_mae_mev"], "force_mae_mev_per_a": errors["force_mae_mev_per_a"]}


def paired_percent(new: list[float], old: list[float]) -> str:
    """Mean ± sd over draws of the per-draw % difference of ``new`` against ``old``."""
    differences = 100.0 * (np.array(new) - np.array(old)) / np.array(old)
    return f"{differences.mean():+.1f} % ± {differences.std(ddof=1) if len(differences) > 1 else 0:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-out", type=Path, required=True)
    parser.add_argument("--tune-root", type=Path, required=True)
    parser.add_argument("--foundation-model", type=Path, default=Path("../shared/models/ani500k_small_CC.model"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        out = args.tune_root / f"seed{seed}"
        tune_draw(args.foundation_model, args.bench_out / "splits" / f"N25_seed{seed}" / "train.xyz", out,
                  args.max_epochs, args.jobs)
        report = json.loads((out / "report.json").read_text())
        tasks = [t for t in report["tasks"]]
        row = {"seed": seed, "winner": report["winner"], "tune": test_errors(out / "best.model", args.bench_out / "splits" / "test.xyz"),
               "tune_wall_time_s": sum(t["wall_time_s"] for t in tasks if not t.get("trained_by"))}
        for method in ("short30", "naive"):
            done = json.loads((args.bench_out / "runs" / method / f"N25_seed{seed}" / "done.json").read_text())
            row[method] = {"energy_mae_mev": done["energy_mae_mev"], "force_mae_mev_per_a": done["force_mae_mev_per_a"],
                           "wall_time_s": done["wall_time_s"]}
        rows.append(row)
    print("| draw (seed) | tune's choice | E: short30 / naive / tune (meV) | F: short30 / naive / tune (meV/Å) | wall: short30 / naive / tune (s) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['winner']} | {r['short30']['energy_mae_mev']:.1f} / {r['naive']['energy_mae_mev']:.1f} / "
              f"{r['tune']['energy_mae_mev']:.1f} | {r['short30']['force_mae_mev_per_a']:.1f} / "
              f"{r['naive']['force_mae_mev_per_a']:.1f} / {r['tune']['force_mae_mev_per_a']:.1f} | "
              f"{r['short30']['wall_time_s']:.0f} / {r['naive']['wall_time_s']:.0f} / {r['tune_wall_time_s']:.0f} |")
    for key, unit in (("energy_mae_mev", "energy MAE"), ("force_mae_mev_per_a", "force MAE")):
        tune = [r["tune"][key] for r in rows]
        print(f"\n{unit}: tune vs short30 {paired_percent(tune, [r['short30'][key] for r in rows])}, "
              f"tune vs naive {paired_percent(tune, [r['naive'][key] for r in rows])} (paired over {len(rows)} draws)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
