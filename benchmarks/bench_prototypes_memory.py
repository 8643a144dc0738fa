"""Benchmark ``protoalign prototypes`` on SPICE-sized sources: peak memory and time against the number of atoms.

For each size N: a synthetic latent file of N atoms x D float32 features (D - 2 interaction columns
+ 2 readout energies; 4 elements with equal shares, each a mixture of 64 Gaussian clusters, as in
bench_prototypes.py) is written in chunks, then ``protoalign prototypes --k K`` runs as the real
command line in a subprocess (wall and CPU time, peak RSS of that process), then the file is
deleted (3 x 10^7 atoms x 256 float32 is ~31 GB: give --workdir a disk with room). The load
average is recorded with each build, since on a shared machine wall time measures the other jobs.

    OMP_NUM_THREADS=2 python benchmarks/bench_prototypes_memory.py --atoms 1000000 10000000 --workdir pmem_work

Results go to docs/benchmarks.md (section "prototypes from a SPICE-sized source") by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prototypes import machine, run_build, write_latents  # noqa: E402


def one_size(workdir: Path, n_atoms: int, n_features: int, k: int, extra: tuple[str, ...], keep: bool) -> dict:
    """Write the latent file of ``n_atoms``, build its prototypes, delete the file; timings and peak RSS."""
    latents, out = workdir / f"latents_{n_atoms}.h5", workdir / f"prototypes_{n_atoms}.h5"
    started = time.perf_counter()
    write_latents(latents, n_atoms, n_features, 4, dtype="float32")
    result = {"atoms": n_atoms, "file_gb": round(latents.stat().st_size / 1e9, 2),
              "write_s": round(time.perf_counter() - started, 1), "load_before": os.getloadavg()}
    try:
        result["build"] = run_build(latents, out, k, extra)
    finally:
        result["load_after"] = os.getloadavg()
        if not keep:
            latents.unlink()
    with open(f"{out}.json") as handle:
        summary = json.load(handle)["results"]
    result["prototypes"] = summary["n_prototypes"]
    result["sample_per_element"] = {z: e["n_sample"] for z, e in summary["elements"].items()}
    return result


def main() -> None:
    """Parse options, run every size in order, print one JSON document (and one line per size as it goes)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sample-atoms", type=int, default=None, help="Passed to the command (default: its own).")
    parser.add_argument("--workdir", type=Path, required=True, help="Folder for the latent files (must have room).")
    parser.add_argument("--keep", action="store_true", help="Keep the latent files.")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    extra = ("--sample-atoms", str(args.sample_atoms)) if args.sample_atoms else ()
    report = {"machine": machine(), "settings": vars(args) | {"workdir": str(args.workdir)}, "sizes": []}
    for n_atoms in args.atoms:
        report["sizes"].append(one_size(args.workdir, n_atoms, args.features, args.k, extra, args.keep))
        print(json.dumps(report["sizes"][-1], default=str), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
