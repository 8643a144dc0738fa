"""Benchmark ``protoalign prototypes``: build time and peak memory, assignment throughput.

Synthetic latent file: N atoms x D features (D - 2 interaction columns + 2 readout energies),
E elements with equal shares, each a mixture of 64 Gaussian clusters (centres ~ N(0, 3^2), unit
noise). The build runs as the real command line in a subprocess (wall and CPU time, peak RSS of
that process); assignment (``protoalign_cli.prototypes.assignment.assign`` over all N atoms, in memory) runs
here (wall and process CPU time, best of --repeats). For scale, the plain MACE baseline measured
side by side is the shared ANI-CC model's forward pass over source geometries (atoms per second of
wall and of CPU time), when ../shared is present. On a machine shared with other jobs, compare CPU
times: wall times then mostly measure the other jobs.

    OMP_NUM_THREADS=2 python benchmarks/bench_prototypes.py [--atoms 1000000 --features 128 --k 64]

Results go to docs/benchmarks.md (section "prototypes") by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ELEMENTS = (1, 6, 7, 8)
SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_latents(path: Path, n_atoms: int, n_features: int, n_elements: int, seed: int = 0, chunk: int = 1 << 16,
                  dtype: str = "float64") -> None:
    """Stream a synthetic latent file of ``dtype`` through schema.LatentWriter (chunks of ``chunk`` atoms)."""
    import h5py

    from protoalign_cli.io import schema

    rng = np.random.default_rng(seed)
    elements = ELEMENTS[:n_elements]
    n_interaction = n_features - 2
    layout = [{"name": "interaction_0", "kind": "interaction", "start": 0, "size": n_interaction},
              {"name": "readout_0", "kind": "energy", "start": n_interaction, "size": 1},
              {"name": "readout_1", "kind": "energy", "start": n_interaction + 1, "size": 1}]
    header = schema.LatentHeader(
        model_sha256="0" * 64, model_path="synthetic.model", mace_version="0.3.16", model_type="ScaleShiftMACE",
        r_max=5.0, e0s={"Default": {str(z): -10.0 * z for z in ELEMENTS}}, heads=["Default"], head="Default",
        layout=layout, source_files=["synthetic.xyz"], dtype=dtype, command_line="bench_prototypes",
        protoalign_version="bench",
    )
    centres = rng.normal(scale=3.0, size=(len(elements), 64, n_features)).reshape(-1, n_features)
    with h5py.File(path, "w") as handle:
        writer = schema.LatentWriter(handle, header, n_features, dtype)
        for start in range(0, n_atoms, chunk):
            n = min(chunk, n_atoms - start)
            element = rng.integers(0, len(elements), size=n)
            z = np.asarray(elements)[element]
            cluster = rng.integers(0, 64, size=n)
            latent = (centres[element * 64 + cluster] + rng.standard_normal(size=(n, n_features))).astype(dtype, copy=False)
            energy = 0.1 * cluster + rng.normal(scale=0.05, size=n)
            writer.append({
                schema.LATENT: latent, schema.ENERGY_MINUS_E0: energy, schema.NODE_ENERGY: energy - 10.0 * z,
                schema.ATOMIC_NUMBER: z, schema.CONFIG_INDEX: np.arange(start, start + n), schema.ATOM_INDEX: np.zeros(n),
                schema.SOURCE_FILE_INDEX: np.zeros(n),
            }, n)
        writer.finish()


def run_build(latents: Path, out: Path, k: int, extra: tuple[str, ...] = ()) -> dict:
    """Run ``protoalign prototypes`` in a subprocess; wall and CPU seconds and the child's peak RSS (GiB)."""
    command = [sys.executable, "-c", "from protoalign_cli.cli import main; main()", "prototypes", str(latents),
               "--out", str(out), "--k", str(k), "--overwrite", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"command": " ".join(command[3:]), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_gib": round(after.ru_maxrss / 2**20, 2)}


def time_assign(latents: Path, prototypes_path: Path, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of ``assign`` over every atom of the latent file (in memory)."""
    from protoalign_cli.io import schema
    from protoalign_cli.prototypes.assignment import assign, load_prototypes

    data = schema.read_latents(latents)
    prototypes = load_prototypes(prototypes_path)
    times, cpu_times = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        prototype_id, _ = assign(prototypes, data.latent, data.atomic_number)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    assert (prototype_id >= 0).all()
    best = min(times)
    return {"atoms": data.n_atoms, "best_s": round(best, 3), "all_s": [round(t, 3) for t in times],
            "cpu_s": [round(t, 3) for t in cpu_times], "atoms_per_s": round(data.n_atoms / best),
            "atoms_per_cpu_s": round(data.n_atoms / min(cpu_times)),
            "peak_rss_gib_this_process": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def time_mace_baseline(n_configs: int = 200) -> dict | None:
    """Atoms/s of the shared ANI-CC model's forward pass (energies and latents, no forces) over benzene."""
    model_path = SHARED / "models" / "ani500k_small_CC.model"
    if not model_path.is_file():
        return None
    import ase.io

    from protoalign_cli.mace.latents import latents_of_atoms
    from protoalign_cli.mace.models import describe_model, load_model

    model = load_model(model_path)
    info = describe_model(model, model_path)
    atoms_list = ase.io.read(SHARED / "data" / "md17-xtb" / "benzene.xyz", index=f":{n_configs}")
    latents_of_atoms(model, info, atoms_list[:8])
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = latents_of_atoms(model, info, atoms_list, batch_size=32)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    n = len(rows["atomic_number"])
    return {"atoms": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "atoms_per_s": round(n / wall),
            "atoms_per_cpu_s": round(n / cpu)}


def machine() -> dict:
    """CPU model, cores visible, load average, thread settings."""
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "load_avg": os.getloadavg(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()}


def main() -> None:
    """Parse options, run the benchmark, print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--elements", type=int, default=4, choices=range(1, len(ELEMENTS) + 1))
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="Folder for the files (default: a temporary one).")
    parser.add_argument("--no-baseline", action="store_true", help="Skip the MACE forward-pass baseline.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        latents, out = workdir / "bench_latents.h5", workdir / "bench_prototypes.h5"
        report = {"machine_start": machine(), "settings": vars(args) | {"workdir": str(workdir)}}
        started = time.perf_counter()
        write_latents(latents, args.atoms, args.features, args.elements)
        report["write_latents_s"] = round(time.perf_counter() - started, 1)
        report["build"] = run_build(latents, out, args.k)
        report["assign"] = time_assign(latents, out, args.repeats)
        report["mace_baseline"] = None if args.no_baseline else time_mace_baseline()
        if report["mace_baseline"]:
            report["assign_over_mace_speed_cpu"] = round(
                report["assign"]["atoms_per_cpu_s"] / report["mace_baseline"]["atoms_per_cpu_s"], 1)
        report["machine_end"] = machine()
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
