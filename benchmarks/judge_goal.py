"""Judge issue 13's goal from the evidence grids' summaries (docs/results/<name>_runs.csv, written by
`protoalign bench CONFIG --summarize`): does some method reach at least 25 % lower test energy MAE than the
converged plain fine-tuning (`naive`) at N <= 25, with forces no worse than +3 %, on aspirin and at least one
other molecule? Differences are paired per seed (same split, same training set), mean ± sd over seeds.

    python benchmarks/judge_goal.py [RUNS_CSV ...]    # default: the four evidence grids' runs.csv

Prints a markdown table (one row per molecule, N and method: ΔE raw, ΔE without the validation offset, ΔF, and
by how much the goal was missed) and the verdict.
"""
import csv
import sys
from pathlib import Path

from protoalign_cli.bench.report import aggregate, plus_minus

ENERGY_GOAL_PERCENT = -25.0  # test energy MAE change against naive, at most
FORCE_LIMIT_PERCENT = 3.0    # test force MAE change against naive, at most
MAX_BUDGET = 25
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
GRIDS = ["aspirin_anicc_evidence", "aspirin_anicc_evidence_n50", "salicylic_anicc_evidence", "naphthalene_anicc_evidence"]
MOLECULE = {"aspirin_anicc_evidence": "aspirin", "aspirin_anicc_evidence_n50": "aspirin",
            "salicylic_anicc_evidence": "salicylic acid", "naphthalene_anicc_evidence": "naphthalene"}


def read_rows(path: Path) -> list[dict]:
    """runs.csv rows with numbers as numbers (n_train and seed as int, the metrics as float)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if key in ("n_train", "seed"):
                    parsed[key] = int(value)
                elif value == "" or key in ("method", "setting", "device"):
                    parsed[key] = value if value != "" else None
                else:
                    parsed[key] = float(value)
            rows.append({k: v for k, v in parsed.items() if v is not None})
    return rows


def shortfall(energy_delta: float, force_delta: float) -> str:
    """'meets' or how far a paired mean change (%) is from the goal, in percentage points."""
    misses = []
    if not energy_delta <= ENERGY_GOAL_PERCENT:
        misses.append(f"E by {energy_delta - ENERGY_GOAL_PERCENT:.1f} pp")
    if not force_delta <= FORCE_LIMIT_PERCENT:
        misses.append(f"F by {force_delta - FORCE_LIMIT_PERCENT:.1f} pp")
    return "meets" if not misses else "misses " + ", ".join(misses)


def main(paths: list[Path]) -> None:
    print("| molecule | N | method | pairs | ΔE raw (%) | ΔE shifted (%) | ΔF (%) | goal (ΔE ≤ -25 %, ΔF ≤ +3 %) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    met: dict[str, set[str]] = {}
    for path in paths:
        molecule = MOLECULE.get(path.name.removesuffix("_runs.csv"), path.name)
        rows = read_rows(path)
        for n in sorted({r["n_train"] for r in rows}):
            for method in dict.fromkeys(r["method"] for r in rows if r["n_train"] == n):
                if method == "naive":
                    continue
                stats = aggregate(rows, method, n, "naive")
                energy, shifted, force = (stats[f"delta_{c}"] for c in
                                          ("energy_mae_mev", "energy_mae_valid_shifted_mev", "force_mae_mev_per_a"))
                verdict = shortfall(energy[0], force[0]) if n <= MAX_BUDGET else "(N > 25: not judged)"
                if verdict == "meets":
                    met.setdefault(method, set()).add(molecule)
                print(f"| {molecule} | {n} | {method} | {energy[2]} | {plus_minus(energy, sign=True)} | "
                      f"{plus_minus(shifted, sign=True)} | {plus_minus(force, sign=True)} | {verdict} |")
    winners = [m for m, molecules in met.items() if "aspirin" in molecules and len(molecules) >= 2]
    print()
    print(f"Goal met by: {', '.join(winners)}" if winners else
          "Goal met by no method (it needs aspirin and at least one other molecule at some N <= 25).")


if __name__ == "__main__":
    arguments = [Path(a) for a in sys.argv[1:]] or [RESULTS / f"{g}_runs.csv" for g in GRIDS]
    main([p for p in arguments if p.is_file()])
