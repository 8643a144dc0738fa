"""The user's labelled configurations: the validation split as index math, the input checks, the split files.

Validation configurations are always contiguous blocks, never random frames: consecutive frames of an MD
trajectory are nearly identical, so a random split puts near-copies of the validation frames into the
training set and the validation error says little about new data. The order is the file's, or that of
``atoms.info[order_key]`` (e.g. a time stamp) when given.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError

HOLDOUT = "holdout"  # the fold name of a single validation set (--valid or --valid-fraction)


def fold_names(folds: int | None) -> list[str]:
    """The validation folds: 'holdout' for one validation set, else 'fold1'..'foldK'."""
    return [HOLDOUT] if folds is None else [f"fold{k}" for k in range(1, folds + 1)]


def contiguous_block(n_configs: int, fraction: float) -> tuple[list[int], list[int]]:
    """Training and validation positions (0-based, in order) when the validation set is the last
    ceil(fraction x n_configs) configurations. ProtoalignError unless both sets hold at least one."""
    n_valid = math.ceil(round(fraction * n_configs, 9))  # rounded first: 0.1 x 30 is 3, not 3.0000000000000004
    if n_valid >= n_configs:
        raise ProtoalignError(f"--valid-fraction {fraction:g} of {n_configs} configuration(s) leaves none to train on; "
                              "give more configurations, a smaller fraction, or a --valid file")
    return list(range(n_configs - n_valid)), list(range(n_configs - n_valid, n_configs))


def contiguous_folds(n_configs: int, folds: int) -> list[tuple[list[int], list[int]]]:
    """Training and validation positions of each of K folds: the configurations cut into K contiguous blocks
    (sizes differing by at most one, the larger first), block k validating fold k and the others training it.
    ProtoalignError unless every fold has at least one validation and one training configuration."""
    if not 2 <= folds <= n_configs:
        raise ProtoalignError(f"--folds {folds} needs at least {max(folds, 2)} configurations (one to validate and one "
                              f"to train each fold); --train has {n_configs}; use fewer folds or --valid-fraction")
    size, extra = divmod(n_configs, folds)
    starts = [k * size + min(k, extra) for k in range(folds + 1)]
    return [([i for i in range(n_configs) if not starts[k] <= i < starts[k + 1]], list(range(starts[k], starts[k + 1])))
            for k in range(folds)]


def order_by_key(values: Sequence[float]) -> list[int]:
    """Positions of the configurations sorted by their ``values`` (e.g. times), ties kept in file order."""
    return sorted(range(len(values)), key=lambda position: values[position])


def key_values(frames: Sequence, key: str, path: Path) -> list[float]:
    """Every configuration's ``atoms.info[key]`` as a number; ProtoalignError naming the first that lacks one."""
    values = []
    for index, atoms in enumerate(frames):
        value = atoms.info.get(key)
        # ase reads integers and floats of the comment line as numpy scalars
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ProtoalignError(f"{path}, configuration {index}: --order-key {key!r} needs a finite number in "
                                  f"every configuration's info, got {value!r}")
        values.append(float(value))
    return values


def read_labelled(path: Path, energy_key: str, forces_key: str, role: str) -> list:
    """Every configuration of a file, each with a finite energy (``atoms.info``, eV) and finite forces
    (``atoms.arrays``, eV/Å) under the given keys and finite positions; ProtoalignError naming file and
    configuration otherwise."""
    from protoalign_cli.io.structures import check_every_label, check_label_keys, read_structures

    frames = read_structures(path, role, [energy_key, forces_key])
    check_label_keys(path, frames, {"energy": energy_key, "forces": forces_key}, role)
    check_every_label(path, frames, energy_key, forces_key)
    return frames


def check_model_elements(frame_sets: dict[Path, list], model_path: Path) -> None:
    """Refuse a configuration holding an element the foundation model lacks (naming file, configuration, symbol)."""
    from protoalign_cli.io.structures import check_elements
    from protoalign_cli.mace.models import load_model

    known = {int(z) for z in load_model(model_path).atomic_numbers}
    for path, frames in frame_sets.items():
        for index, atoms in enumerate(frames):
            check_elements(atoms.numbers, known, path, index)


def check_prototypes_model(prototypes: Path, model_path: Path) -> None:
    """Refuse prototypes built from another model than the foundation model (their recorded model_sha256)."""
    from protoalign_cli.prototypes.assignment import load_prototypes, pretrained_model

    pretrained_model(load_prototypes(prototypes), model_path)


def validation_splits(n_configs: int, mode: str, fraction: float | None, folds: int | None,
                      order: Sequence[int]) -> dict[str, tuple[list[int], list[int]]]:
    """Fold name -> (training, validation) configuration indices of --train (file positions) for the modes
    'fraction' and 'folds'; the blocks are contiguous in ``order`` (positions in the order to split in)."""
    if mode == "fraction":
        parts = {HOLDOUT: contiguous_block(n_configs, fraction)}
    else:
        parts = dict(zip(fold_names(folds), contiguous_folds(n_configs, folds)))
    return {fold: ([order[i] for i in train], [order[i] for i in valid]) for fold, (train, valid) in parts.items()}


def write_split(frames: Sequence, indices: Sequence[int], path: Path) -> None:
    """Write the configurations at ``indices`` to ``path`` (extxyz, atomically); an existing file is kept."""
    import ase.io

    from protoalign_cli.io.outputs import atomic_output

    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=False) as tmp:
        ase.io.write(tmp, [frames[i] for i in indices], format="extxyz")
