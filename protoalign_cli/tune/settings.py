"""What ``protoalign tune`` was asked: ``TuneSettings`` from the command line, their checks, and OUT/tune.json.

tune.json records the settings with every input file's sha256 and the candidate set as data. A later call on
the same --out must define the same trainings: the same file contents, validation scheme, candidates,
--max-epochs, label keys, device and alignment choice; paths may differ (a file moved, another working
folder), and so may the criterion's weights (they choose among finished trainings, they train nothing).
Task subprocesses (``--task I``) and SLURM array tasks read their settings back from tune.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune import (DEFAULT_CANDIDATES, DEFAULT_ENERGY_KEY, DEFAULT_ENERGY_WEIGHT, DEFAULT_FORCES_KEY,
                                 DEFAULT_FORCES_WEIGHT, DEFAULT_VALID_FRACTION)

if TYPE_CHECKING:
    from protoalign_cli.tune.candidates import CandidateSet

SETTINGS_FILE = "tune.json"
INPUT_FILES = ("foundation_model", "train", "valid", "prototypes")
# what a later call may change: where the files are, and the weights of the choice among finished trainings
FREE_KEYS = (*INPUT_FILES, "candidates_file", "energy_weight", "forces_weight")


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """The options of one ``protoalign tune`` call (paths absolute once ``resolved``).

    Validation: ``valid`` (a file), ``valid_fraction`` (the last block of the training configurations) or
    ``folds`` (K contiguous blocks), ordered by ``atoms.info[order_key]`` when given, else by file order.
    ``candidates``: 'default' or a YAML file; ``max_epochs`` caps every candidate's training length.
    """

    foundation_model: Path
    train: Path
    out: Path
    valid: Path | None = None
    valid_fraction: float | None = None
    order_key: str | None = None
    folds: int | None = None
    prototypes: Path | None = None
    candidates: str = DEFAULT_CANDIDATES
    energy_weight: float = DEFAULT_ENERGY_WEIGHT
    forces_weight: float = DEFAULT_FORCES_WEIGHT
    max_epochs: int | None = None
    energy_key: str = DEFAULT_ENERGY_KEY
    forces_key: str = DEFAULT_FORCES_KEY
    device: str = "cpu"
    keep_alignment: bool = False

    @property
    def validation_mode(self) -> str:
        """'file' (--valid), 'folds' (--folds) or 'fraction' (--valid-fraction, the default)."""
        return "file" if self.valid is not None else "folds" if self.folds is not None else "fraction"

    def with_default_validation(self) -> TuneSettings:
        """The settings with the default validation fraction when neither a file, a fraction nor folds is given."""
        if self.valid is None and self.valid_fraction is None and self.folds is None:
            return dataclasses.replace(self, valid_fraction=DEFAULT_VALID_FRACTION)
        return self

    def resolved(self) -> TuneSettings:
        """The settings with absolute paths (as tune.json records them, for task subprocesses)."""
        def absolute(path: Path | None) -> Path | None:
            return None if path is None else Path(path).expanduser().resolve()

        candidates = self.candidates if self.candidates == DEFAULT_CANDIDATES else str(absolute(Path(self.candidates)))
        return dataclasses.replace(self, foundation_model=absolute(self.foundation_model), train=absolute(self.train),
                                   out=absolute(self.out), valid=absolute(self.valid),
                                   prototypes=absolute(self.prototypes), candidates=candidates)


def check_options(settings: TuneSettings) -> None:
    """Refuse option values that cannot work and input files that are not there (before anything is read)."""
    if settings.valid is not None and settings.folds is not None:
        raise ProtoalignError("--valid and --folds exclude each other: validate on a file, or on K folds of --train")
    if settings.valid_fraction is not None and (settings.valid is not None or settings.folds is not None):
        raise ProtoalignError("--valid-fraction excludes --valid and --folds: choose one validation scheme")
    if settings.valid_fraction is not None and not 0 < settings.valid_fraction < 1:
        raise ProtoalignError(f"--valid-fraction must be between 0 and 1 (exclusive), got {settings.valid_fraction:g}")
    if settings.folds is not None and settings.folds < 2:
        raise ProtoalignError(f"--folds must be >= 2 (each fold validates on one of K blocks), got {settings.folds}")
    if settings.order_key is not None and settings.valid is not None:
        raise ProtoalignError("--order-key orders --train for --valid-fraction or --folds; with --valid it does nothing")
    if settings.max_epochs is not None and settings.max_epochs < 1:
        raise ProtoalignError(f"--max-epochs must be >= 1, got {settings.max_epochs}")
    if min(settings.energy_weight, settings.forces_weight) < 0 or settings.energy_weight + settings.forces_weight <= 0:
        raise ProtoalignError("--energy-weight and --forces-weight must be >= 0 and not both 0")
    for option, path in (("--foundation-model", settings.foundation_model), ("--train", settings.train),
                         ("--valid", settings.valid), ("--prototypes", settings.prototypes)):
        if path is not None and not Path(path).is_file():
            raise ProtoalignError(f"{option} {path} does not exist" if not Path(path).exists()
                                  else f"{option} {path} is not a file")
    if Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise ProtoalignError(f"--out {settings.out} is a file; give a folder")


def settings_record(settings: TuneSettings, candidates: CandidateSet) -> dict:
    """tune.json: the (resolved) settings, every input file's sha256 and the candidate set as data."""
    from protoalign_cli.io.provenance import sha256_file

    files = {name: getattr(settings, name) for name in INPUT_FILES}
    return {
        **{name: None if path is None else str(path) for name, path in files.items()},
        "sha256": {name: None if path is None else sha256_file(path) for name, path in files.items()},
        "validation": {"mode": settings.validation_mode, "valid_fraction": settings.valid_fraction,
                       "folds": settings.folds, "order_key": settings.order_key},
        "candidates_file": candidates.source, "candidates": candidates.data,
        "max_epochs": settings.max_epochs, "energy_key": settings.energy_key, "forces_key": settings.forces_key,
        "device": settings.device, "keep_alignment": settings.keep_alignment,
        "energy_weight": settings.energy_weight, "forces_weight": settings.forces_weight,
    }


def differing_settings(record: dict, earlier: dict) -> list[str]:
    """The keys of tune.json that define the trainings (all but ``FREE_KEYS``) and differ between two records."""
    keys = sorted((set(record) | set(earlier)) - set(FREE_KEYS))
    return [key for key in keys if record.get(key) != earlier.get(key)]


def read_record(out: Path) -> dict | None:
    """The tune.json of an output folder, or None when it has none."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ProtoalignError(f"{path} is not valid JSON; was --out made by protoalign tune?") from None


def check_same_settings(record: dict, earlier: dict | None, out: Path) -> None:
    """Refuse an output folder made with settings that define other trainings."""
    if earlier is None:
        return
    differing = differing_settings(record, earlier)
    if differing:
        raise ProtoalignError(f"{out} was made with other settings ({', '.join(differing)} differ); use another --out")


def write_record(out: Path, record: dict) -> None:
    """Write OUT/tune.json (indented JSON) atomically, replacing an earlier one."""
    from protoalign_cli.io.outputs import atomic_output

    with atomic_output(Path(out) / SETTINGS_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def settings_from_record(record: dict, out: Path) -> TuneSettings:
    """The settings a tune.json records (what a task subprocess runs with)."""
    def path(name: str) -> Path | None:
        return None if record.get(name) is None else Path(record[name])

    validation = record["validation"]
    return TuneSettings(
        foundation_model=path("foundation_model"), train=path("train"), out=Path(out).resolve(), valid=path("valid"),
        valid_fraction=validation["valid_fraction"], order_key=validation["order_key"], folds=validation["folds"],
        prototypes=path("prototypes"), candidates=record["candidates_file"], energy_weight=record["energy_weight"],
        forces_weight=record["forces_weight"], max_epochs=record["max_epochs"], energy_key=record["energy_key"],
        forces_key=record["forces_key"], device=record["device"], keep_alignment=record["keep_alignment"])
