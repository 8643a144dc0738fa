"""Benchmark ``protoalign extract`` against a plain batched MACE forward pass (CPU).

Both sides use the same model, the same structures (read with ase.io.iread), the same batch size
and the same graph construction (``protoalign_cli.mace.latents.atoms_to_graph``). Every measurement
runs in a fresh subprocess, baseline and extract alternating, so each one also reports its own
peak resident memory (ru_maxrss). The timed span is the same on both sides: from loading the
model to the last batch (extract also scans the inputs, writes HDF5 and the run summary).
Throughput is atoms per second of process CPU time (one thread), which other jobs sharing the
cores disturb much less than wall-clock time; wall-clock rates are printed too.

Inputs: the md17-xtb source geometries of ../shared (benzene, ethanol, malonaldehyde, toluene,
uracil; 800 frames each), copied into a scratch folder as many times as needed to reach the
largest size (extract refuses the same file twice), then capped with --max-configs.

    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --sizes 1000 10000 --repeats 3 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
SOURCES = ("benzene", "ethanol", "malonaldehyde", "toluene", "uracil")
FRAMES_PER_FILE = 800


def source_files(scratch: Path, n_configs: int) -> list[Path]:
    """Copies of the source geometry files, cycled, enough to hold ``n_configs`` configurations."""
    needed = -(-n_configs // FRAMES_PER_FILE)
    files = []
    for k, name in zip(range(needed), itertools.cycle(SOURCES)):
        copy = scratch / f"cycle{k // len(SOURCES)}_{name}.xyz"
        if not copy.exists():
            shutil.copy(SHARED / "data" / "md17-xtb" / f"{name}.xyz", copy)
        files.append(copy)
    return files


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_baseline(model_path: Path, files: list[Path], n_configs: int, batch_size: int, dtype: str) -> dict:
    """Plain batched forward: iread -> atoms_to_graph -> Batch -> model(...) without forces; returns timing."""
    import ase.io
    import torch
    from mace.tools import torch_geometric
    from mace.tools.torch_tools import default_dtype

    from protoalign_cli.mace.latents import atoms_to_graph
    from protoalign_cli.mace.models import describe_model, import_mace_quietly, load_model

    import_mace_quietly()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = load_model(model_path, "cpu", dtype)
    info = describe_model(model, model_path)
    head = info.heads[0]
    frames = itertools.islice(itertools.chain.from_iterable(ase.io.iread(f, index=":") for f in files), n_configs)
    n_atoms = 0
    with default_dtype(dtype), torch.no_grad():
        for chunk in iter(lambda: list(itertools.islice(frames, batch_size)), []):
            graphs = [atoms_to_graph(atoms, info, head) for atoms in chunk]
            batch = torch_geometric.batch.Batch.from_data_list(graphs)
            model(batch.to_dict(), training=False, compute_force=False)
            n_atoms += sum(len(atoms) for atoms in chunk)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, "atoms": n_atoms}


def run_extract_once(model_path: Path, files: list[Path], n_configs: int, batch_size: int, dtype: str, out: Path) -> dict:
    """``protoalign extract`` through the library into ``out``; returns timing."""
    from protoalign_cli.extract import ExtractRequest, run_extract
    from protoalign_cli.mace.models import import_mace_quietly

    import_mace_quietly()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run_extract(ExtractRequest(model=str(model_path), configs=files, out=out, dtype=dtype,
                                        batch_size=batch_size, max_configs=n_configs, overwrite=True, progress=False))
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "atoms": result["n_atoms"]}


def child(args) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    files = source_files(args.scratch, args.size)
    if args.child == "baseline":
        timing = run_baseline(args.model, files, args.size, args.batch_size, args.dtype)
    else:
        timing = run_extract_once(args.model, files, args.size, args.batch_size, args.dtype,
                                  args.scratch / f"latents_{args.size}.h5")
    print(json.dumps({**timing, "peak_rss_mib": peak_rss_mib()}))


def measure(kind: str, size: int, args) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--size", str(size), "--model", str(args.model),
               "--scratch", str(args.scratch), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"{kind} {size} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind:8s} {size:6d} configs: {result['atoms'] / result['cpu_seconds']:8.1f} atoms/CPU-s, "
          f"{result['cpu_seconds']:7.1f} CPU-s, {result['seconds']:7.1f} s wall, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "ani500k_small_CC.model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 1], help="Alternating pairs per size.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--child", choices=["baseline", "extract"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not args.model.is_file():
        sys.exit(f"model {args.model} not found (needs ../shared)")
    repeats = args.repeats + [args.repeats[-1]] * (len(args.sizes) - len(args.repeats))
    with tempfile.TemporaryDirectory(prefix="bench_extract_", dir=args.scratch) as scratch:
        args.scratch = Path(scratch)
        source_files(args.scratch, max(args.sizes))
        rows = []
        for size, n_repeats in zip(args.sizes, repeats):
            runs = {"baseline": [], "extract": []}
            for _ in range(n_repeats):
                for kind in ("baseline", "extract"):
                    runs[kind].append(measure(kind, size, args))
            rate = {k: statistics.median(r["atoms"] / r["cpu_seconds"] for r in v) for k, v in runs.items()}
            ratios = [b["cpu_seconds"] / e["cpu_seconds"] for b, e in zip(runs["baseline"], runs["extract"])]
            wall = [b["seconds"] / e["seconds"] for b, e in zip(runs["baseline"], runs["extract"])]
            rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
            rows.append((size, runs["extract"][0]["atoms"], n_repeats, rate, ratios, wall, rss))
    print(f"\ndtype {args.dtype}, batch size {args.batch_size}, {args.threads} thread(s); rates are medians over the "
          "pairs, ratio = extract/baseline throughput per pair: median [min-max]")
    print("| configs | atoms | pairs | baseline atoms/CPU-s | extract atoms/CPU-s | ratio (CPU time) | ratio (wall) "
          "| peak RSS baseline | peak RSS extract |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, atoms, n_repeats, rate, ratios, wall, rss in rows:
        print(f"| {size} | {atoms} | {n_repeats} | {rate['baseline']:.0f} | {rate['extract']:.0f} | "
              f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}] | {statistics.median(wall):.3f} | "
              f"{rss['baseline']:.0f} MiB | {rss['extract']:.0f} MiB |")


if __name__ == "__main__":
    main()
