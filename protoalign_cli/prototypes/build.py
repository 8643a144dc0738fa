"""Stage 2: per-element prototypes of source latents, FAISS-indexed, with member energy statistics.

For every chemical element, the selected latent columns of its atoms are standardized (per-feature
z-scores of that element; stored so that new latents are mapped the same way) and clustered with
FAISS k-means. Each prototype carries its centroid (standardized space), member count, the mean
and standard deviation of its members' energy minus E0 (eV) and a radius, the 95th percentile of
the members' Euclidean distances to the centroid (standardized units), which later stages use to
recognise atoms that lie outside the source distribution.

Membership is always the exact nearest centroid (``nearest_prototypes``), the same search that
``assign`` runs, so the stored statistics are those that ``assign`` reproduces. Elements with more
than ``sample_atoms`` atoms are clustered on a seeded sample and streamed for their statistics, in
bounded memory (``protoalign_cli.prototypes.streaming``); smaller ones are clustered whole.

With ``--k auto`` the number of prototypes per element is chosen over a grid by an information
criterion (``kmeans_information_criteria``): the k-means partition read as a hard-assignment mixture
of Gaussians sharing one diagonal variance.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from protoalign_cli import __version__
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io import schema
from protoalign_cli.io.outputs import atomic_output, check_writable
from protoalign_cli.io.provenance import command_line, package_version, run_summary, write_summary
from protoalign_cli.io.schema import Prototypes
from protoalign_cli.prototypes.clustering import gpu_available, single_member_count
from protoalign_cli.prototypes.features import FEATURE_KINDS, feature_columns
from protoalign_cli.prototypes.search import flat_index
from protoalign_cli.prototypes.sources import open_sources
from protoalign_cli.prototypes.streaming import DEFAULT_SAMPLE_ATOMS, ClusterSettings, prototypes_of_elements

DEFAULT_K = "auto"
DEFAULT_K_GRID = (2, 4, 8, 16, 32, 64)
CRITERIA = ("bic", "aic")
DEFAULT_CRITERION = "bic"
DEFAULT_FEATURES = "all"
DEFAULT_NITER = 25
VERSIONED_PACKAGES = ("mace-torch", "torch", "faiss-cpu", "h5py", "numpy")
FEATURE_CHOICES = tuple(FEATURE_KINDS)


def parse_k(text: str | int) -> int | str:
    """Parse ``--k``: a positive integer or 'auto'."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        k = int(text)
    except (TypeError, ValueError):
        raise ProtoalignError(f"--k must be a positive integer or 'auto', not {text!r}") from None
    if k < 1:
        raise ProtoalignError(f"--k must be >= 1, not {k}")
    return k


def parse_k_grid(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``--k-grid`` ('2,4,8' or a sequence): distinct positive integers, ascending."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        grid = sorted({int(part) for part in parts if str(part).strip()})
    except ValueError:
        raise ProtoalignError(f"--k-grid must be comma-separated positive integers, not {text!r}") from None
    if not grid or grid[0] < 1:
        raise ProtoalignError(f"--k-grid must hold positive integers, not {text!r}")
    return tuple(grid)


@dataclasses.dataclass
class PrototypesRequest:
    """Everything ``protoalign prototypes`` was asked to do."""

    latents: Sequence[Path]
    out: Path
    k: int | str = DEFAULT_K
    k_grid: Sequence[int] = DEFAULT_K_GRID
    criterion: str = DEFAULT_CRITERION
    features: str = DEFAULT_FEATURES
    standardize: bool = True
    niter: int = DEFAULT_NITER
    seed: int = 0
    sample_atoms: int = DEFAULT_SAMPLE_ATOMS
    gpu: bool = False
    overwrite: bool = False


def summary_path(out: Path) -> Path:
    """Where the JSON run summary of a prototype file goes (``P.h5`` -> ``P.h5.json``)."""
    return Path(f"{out}.json")


def build_prototypes(request: PrototypesRequest, report: Callable[[str], None] = lambda message: None) -> dict:
    """Cluster the latent files' atoms per element into a prototype file; return the run summary.

    ``report`` receives progress and warning lines (one per call). Raises ProtoalignError on bad
    input before anything is written; the output (and its ``.json`` summary) appear only complete.
    """
    started = time.perf_counter()
    settings = _settings(request)
    paths = [Path(p) for p in request.latents]
    if not paths:
        raise ProtoalignError("give at least one latent file")
    out = Path(request.out)
    for target in (out, summary_path(out)):
        check_writable(target, request.overwrite, file=True)
    if out.resolve() in {p.resolve() for p in paths}:
        raise ProtoalignError(f"--out {out} is one of the input latent files")

    sources = open_sources(paths)
    first = sources.first
    columns = feature_columns(first, request.features)
    if settings.gpu and not gpu_available():
        report("--gpu: FAISS has no GPU here (faiss-cpu build or no visible GPU); clustering on the CPU")
        settings.gpu = False

    counts = sources.element_counts(settings.chunk_rows)
    check_k_fits(settings.k, counts)
    missing = [z for z in sorted(int(z) for z in first.e0s[first.head]) if z not in counts]
    notes = []
    if missing:
        notes.append(f"no source atoms of Z={', '.join(map(str, missing))}: those elements get no prototypes "
                     "(assign returns -1 for them)")
        report(notes[-1])
    elements = prototypes_of_elements(sources, columns, counts, settings, report)
    for element in elements:
        notes += element.notes
        warning = single_member_warning(element.z, element.statistics["count"])
        if warning:
            notes.append(warning)
            report(warning)

    prototypes = _assemble(first, sources.provenance(), sources.headers, request, settings, columns, elements, notes)
    summary = run_summary("prototypes", inputs={
        "latents": [str(p) for p in paths], "out": str(out), "k": str(settings.k), "k_grid": list(settings.k_grid),
        "criterion": request.criterion, "features": request.features, "standardize": request.standardize,
        "niter": request.niter, "seed": request.seed, "sample_atoms": request.sample_atoms, "gpu": request.gpu,
        "gpu_used": settings.gpu,
    }, results={
        "model_sha256": first.model_sha256, "head": first.head, "n_prototypes": int(len(prototypes.element)),
        "n_features": int(len(columns)),
        "elements": {str(e.z): {"n_atoms": e.n_atoms, "n_sample": e.n_sample, "n_distinct": e.n_distinct,
                                "k_asked": e.k_asked, "k_chosen": int(len(e.centroid)), "curve": e.curve} for e in elements},
        "elements_without_atoms": missing, "notes": notes, "latent_files": prototypes.latent_files,
        "seconds": round(time.perf_counter() - started, 3),
    })
    with atomic_output(out, request.overwrite) as tmp, atomic_output(summary_path(out), request.overwrite) as tmp_summary:
        schema.write_prototypes(tmp, prototypes)
        write_summary(tmp_summary, summary)
    return summary


def check_k_fits(k: int | str, counts: dict[int, int]) -> None:
    """Refuse a fixed K above an element's number of source atoms (``counts``: {Z: atoms}).

    Its prototypes would be single atoms of radius 0, which cover no target atom; clipping K per element
    would make the file's K say something else than what was built. --k auto fits K to each element.
    """
    from ase.data import chemical_symbols

    if k == "auto":
        return
    short = {z: n for z, n in sorted(counts.items()) if n < k}
    if short:
        listed = ", ".join(f"Z={z} ({chemical_symbols[z]}): {n} atoms" for z, n in short.items())
        raise ProtoalignError(f"--k {k} is more than the source atoms of {listed}; give --k {min(short.values())} "
                              "or less, or --k auto (K chosen per element)")


def single_member_warning(z: int, count: np.ndarray) -> str | None:
    """The warning for an element some of whose prototypes have a single member (``count`` [P]), else None."""
    from ase.data import chemical_symbols

    n = single_member_count(count)
    if not n:
        return None
    return (f"warning: Z={z} ({chemical_symbols[z]}): {n} of {len(count)} prototypes have a single member "
            "(radius 0): no target atom near them counts as covered; a smaller K (--k-grid) or more source "
            "atoms avoids this")


def absolute_model_path(model_path: str) -> str:
    """The pretrained model's path as a latent file records it, made absolute when it names a file from here.

    Extract records the path as given; resolved, the prototype file still names the model when read
    from another folder. A relative path naming no file here stays as recorded.
    """
    path = Path(model_path)
    return str(path.resolve()) if not path.is_absolute() and path.is_file() else model_path


def _settings(request: PrototypesRequest) -> ClusterSettings:
    """The request's options checked (ProtoalignError on a bad one) and parsed."""
    k = parse_k(request.k)
    k_grid = parse_k_grid(request.k_grid)
    if request.criterion not in CRITERIA:
        raise ProtoalignError(f"--criterion must be one of {', '.join(CRITERIA)}, not {request.criterion!r}")
    if request.niter < 1:
        raise ProtoalignError(f"--niter must be >= 1, not {request.niter}")
    if request.seed < 0:
        raise ProtoalignError(f"--seed must be >= 0, not {request.seed}")
    if request.sample_atoms < 1:
        raise ProtoalignError(f"--sample-atoms must be >= 1, not {request.sample_atoms}")
    return ClusterSettings(k=k, k_grid=k_grid, criterion=request.criterion, standardize=bool(request.standardize),
                           niter=request.niter, seed=request.seed, gpu=bool(request.gpu), sample_atoms=request.sample_atoms)


def _assemble(first, latent_files, headers, request, settings, columns, elements, notes) -> Prototypes:
    structure_files: list[str] = []
    for header in headers:
        structure_files += [s for s in header.source_files if s not in structure_files]

    def stacked(key):
        return np.concatenate([e.statistics[key] for e in elements])

    return Prototypes(
        model_sha256=first.model_sha256, model_path=absolute_model_path(first.model_path), model_type=first.model_type,
        mace_version=first.mace_version, r_max=float(first.r_max), head=first.head, heads=list(first.heads),
        e0s=first.e0s, layout=first.layout, latent_dtype=first.dtype, latent_files=latent_files,
        structure_files=structure_files, features=request.features, columns=np.asarray(columns, dtype=np.int64),
        standardized=bool(request.standardize), k_requested=str(settings.k), k_grid=list(settings.k_grid),
        criterion=request.criterion, seed=int(request.seed), niter=int(request.niter),
        element=np.concatenate([np.full(len(e.centroid), e.z, dtype=np.int32) for e in elements]),
        centroid=np.concatenate([e.centroid for e in elements]),
        count=stacked("count"), energy_mean=stacked("energy_mean"), energy_std=stacked("energy_std"),
        radius=stacked("radius"),
        elements=np.array([e.z for e in elements], dtype=np.int32),
        feature_mean=np.stack([e.feature_mean for e in elements]), feature_std=np.stack([e.feature_std for e in elements]),
        n_atoms=np.array([e.n_atoms for e in elements], dtype=np.int64),
        n_distinct=np.array([e.n_distinct for e in elements], dtype=np.int64),
        index={e.z: flat_index(e.centroid) for e in elements},
        curves={e.z: e.curve for e in elements},
        command_line=command_line(), protoalign_version=__version__,
        versions={name: package_version(name) for name in VERSIONED_PACKAGES}, notes=list(notes),
    )
