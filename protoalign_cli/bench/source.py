"""Source-domain products of a bench, built once and cached under OUT/source/: the chosen source
structures, their latents, prototype files and foundation-model pseudolabels.

A method names the products it reads (``Method.source_products``) as objects that know how to
build themselves; ``prepare_source`` builds whichever are missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from protoalign_cli.bench.command import cli_command, run_logged
from protoalign_cli.bench.evaluate import calculator
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_output

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig
    from protoalign_cli.bench.layout import BenchLayout
    from protoalign_cli.bench.methods.base import Method

STRUCTURES = "structures.xyz"
LATENTS = "latents.h5"


class SourceProduct(Protocol):
    """A file a method reads from the source domain, and how to build it."""

    path: Path

    def build(self, key: str, config: BenchConfig, source_dir: Path, say: Callable[[str], None]) -> None:
        """Write ``path`` (``key``: its name among the products, for logs and messages)."""


@dataclasses.dataclass(frozen=True)
class PrototypeFile:
    """Prototypes of the source latents built with ``protoalign prototypes PROTOTYPES_ARGS`` (or prebuilt)."""

    path: Path
    prototypes_args: tuple[str, ...]

    def build(self, key: str, config: BenchConfig, source_dir: Path, say: Callable[[str], None]) -> None:
        """Extract the source latents (once), then cluster them into ``path``."""
        latents = source_dir / LATENTS
        if not latents.is_file():
            structures = source_dir / STRUCTURES
            say(f"source: extracting latents of {config.foundation_model.name} over {structures}")
            run_logged(cli_command("extract", "--model", str(config.foundation_model), "--configs", str(structures),
                                   "--out", str(latents), "--device", config.device, *config.source_extract_args),
                       source_dir / "extract.log")
        say(f"source: building {key} ({' '.join(self.prototypes_args) or 'defaults'})")
        run_logged(cli_command("prototypes", str(latents), "--out", str(self.path), *self.prototypes_args),
                   source_dir / f"{key}.log")


@dataclasses.dataclass(frozen=True)
class Pseudolabels:
    """The source structures labelled with the foundation model's energies (eV) and forces (eV/Å)."""

    path: Path

    def build(self, key: str, config: BenchConfig, source_dir: Path, say: Callable[[str], None]) -> None:
        """Label the cached source structures into ``path``."""
        structures = source_dir / STRUCTURES
        say(f"source: labelling {structures} with {config.foundation_model.name} (multihead replay)")
        write_pseudolabels(config, structures, self.path)


def method_products(method: Method, config: BenchConfig, layout: BenchLayout) -> dict[str, Path]:
    """Paths of the source products one method reads, by key."""
    return {key: product.path for key, product in method.source_products(config, layout.source_dir).items()}


def source_products(config: BenchConfig, layout: BenchLayout) -> dict[str, Path]:
    """Paths of the source products the config's methods need, by key (prototype files, pseudolabels)."""
    products: dict[str, Path] = {}
    for method in config.methods:
        products.update(method_products(method, config, layout))
    return products


def prepare_source(config: BenchConfig, layout: BenchLayout, say=print) -> dict[str, Path]:
    """Build (once, cached under source/) the source structures, latents, prototypes and pseudolabels."""
    needed: dict[str, SourceProduct] = {}
    for method in config.methods:
        needed.update(method.source_products(config, layout.source_dir))
    products = {key: product.path for key, product in needed.items()}
    if all(path.is_file() for path in products.values()):
        return products
    layout.source_dir.mkdir(parents=True, exist_ok=True)
    structures = layout.source_dir / STRUCTURES
    if config.source_structures and not structures.is_file():
        write_source_structures(config, structures)
    for key, product in needed.items():
        if not product.path.is_file():
            product.build(key, config, layout.source_dir, say)
    return products


def write_source_structures(config: BenchConfig, path: Path) -> None:
    """Concatenate the source files: of each, the frames in ``source.frames`` [start, stop) (all when unset),
    of those ``configs_per_file`` evenly spaced ones (all when unset)."""
    import ase.io

    from protoalign_cli.io.structures import iter_structures

    chosen = []
    for source in config.source_structures:
        frames = list(iter_structures(source))
        if config.source_frames is not None:
            start, stop = config.source_frames
            if len(frames) < stop:
                raise ProtoalignError(f"{source} has {len(frames)} frames; source.frames needs {stop}")
            frames = frames[start:stop]
        if config.source_configs_per_file:
            frames = [frames[i] for i in evenly_spaced(len(frames), config.source_configs_per_file)]
        chosen += frames
    with atomic_output(path, overwrite=False) as tmp:
        ase.io.write(tmp, chosen, format="extxyz")


def evenly_spaced(n_frames: int, count: int) -> np.ndarray:
    """Indices of ``count`` (at most ``n_frames``) evenly spaced frames among ``n_frames``, first and last included."""
    return np.unique(np.linspace(0, n_frames - 1, min(count, n_frames)).round().astype(int))


def write_pseudolabels(config: BenchConfig, structures: Path, path: Path) -> None:
    """Label the source structures with the foundation model's energies/forces under the target keys."""
    import ase
    import ase.io

    from protoalign_cli.io.structures import iter_structures

    model = calculator(config.foundation_model, config.device)
    labelled = []
    for atoms in iter_structures(structures):
        bare = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        bare.calc = model
        energy, forces = bare.get_potential_energy(), bare.get_forces()
        bare.calc = None
        bare.info[config.energy_key] = energy
        bare.arrays[config.forces_key] = forces
        labelled.append(bare)
    with atomic_output(path, overwrite=False) as tmp:
        ase.io.write(tmp, labelled, format="extxyz")
