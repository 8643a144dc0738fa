"""The target data of a bench: its labelled frames, the time-separated split, and the split files
(validation, test, and one training subset per (N, seed)) written once per bench folder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_output

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig
    from protoalign_cli.bench.layout import BenchLayout, Run


def training_order(pool_size: int, seed: int) -> np.ndarray:
    """A seeded permutation of pool positions; the first N are the training set of budget N.

    Budgets of one seed are therefore nested (N = 25 is inside N = 50), which makes learning
    curves less noisy; different seeds give independent subsets.
    """
    return np.random.default_rng(seed).permutation(pool_size)


def read_target_frames(config: BenchConfig) -> list:
    """All frames of the target files (a list of lists of ase.Atoms, one list per file).

    Every frame needs finite positions and the energy (``atoms.info``) and forces (``atoms.arrays``)
    labels of the config, finite, as the training and the evaluation read them.
    """
    from protoalign_cli.io.structures import check_every_label, read_structures

    split = config.split
    needed = max(split.pool[1], split.valid[1], split.test[1])
    frames = []
    for path in config.target_files:
        atoms_list = read_structures(path, "target", [config.energy_key, config.forces_key])
        if len(atoms_list) < needed:
            raise ProtoalignError(f"{path} has {len(atoms_list)} frames; the split needs {needed}")
        check_every_label(path, atoms_list, config.energy_key, config.forces_key)
        frames.append(atoms_list)
    return frames


def split_frames(config: BenchConfig, frames: list, n_train: int | None, seed: int | None, part: str) -> list:
    """The frames of one part ('train' needs n_train and seed; 'valid'; 'test') over all target files."""
    split = config.split
    if part == "valid":
        return [f for per_file in frames for f in per_file[split.valid[0]:split.valid[1]:split.valid_stride]]
    if part == "test":
        return [f for per_file in frames for f in per_file[split.test[0]:split.test[1]]]
    pool = [f for per_file in frames for f in per_file[split.pool[0]:split.pool[1]]]
    return [pool[i] for i in training_order(len(pool), seed)[:n_train]]


def prepare_splits(config: BenchConfig, layout: BenchLayout, runs: Sequence[Run]) -> None:
    """Write the validation, test and every (N, seed) training file once; existing files are kept."""
    import ase.io

    wanted = sorted({(r.n_train, r.seed) for r in runs})
    paths = [layout.valid_file, layout.test_file, *(layout.train_file(n, s) for n, s in wanted)]
    if all(p.is_file() for p in paths):
        return
    frames = read_target_frames(config)
    parts = [(layout.valid_file, None, None, "valid"), (layout.test_file, None, None, "test")]
    parts += [(layout.train_file(n, s), n, s, "train") for n, s in wanted]
    for path, n, seed, part in parts:
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, overwrite=False) as tmp:
            ase.io.write(tmp, split_frames(config, frames, n, seed, part), format="extxyz")
