"""The candidates ``protoalign tune`` chooses among: the default set, a user's YAML file, which of them run, and
the training-length options (--max-epochs, the final retrain) as pure functions on argument lists.

A candidate file is a list of entries in the bench's method syntax (``protoalign_cli.bench.methods``:
name, method, args, refit_offset, align_weight, align_args), or a mapping {mace_args: [...], candidates:
[...]} whose mace_args replace the default recipe. Every candidate trains with the recipe, then its own args
(later arguments win in mace_run_train's parser).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

from protoalign_cli.bench.methods import Method, parse_method
from protoalign_cli.bench.methods.align import Align
from protoalign_cli.bench.values import as_args, harness_clash, read_yaml
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune import DEFAULT_CANDIDATES

DEFAULT_CANDIDATES_YAML = """\
# protoalign tune's default candidates (print them with `protoalign tune --show-candidates`, edit a copy,
# pass it with --candidates FILE.yaml). The recipe is the converged one of the recipe grid, chosen on
# validation (docs/results.md, "Against a converged baseline"); the others move one thing each.
# mace_args: the mace_run_train recipe every candidate shares; a candidate's args come after and win.
# (mace 0.3.16 stops early only in distributed runs: on one process --patience only logs, every run trains
# max_num_epochs and keeps the epoch of lowest validation loss.)
mace_args: [--E0s, estimated, --lr, '0.005', --ema, --ema_decay, '0.99', --batch_size, '5',
            --max_num_epochs, '200', --patience, '30', --default_dtype, float64]
candidates:
  - {name: lr5e-3, method: naive}                                     # the converged recipe
  - {name: lr3e-3, method: naive, args: {lr: 0.003}}                  # a lower learning rate
  - {name: lr5e-3_e100, method: naive, args: {max_num_epochs: 100}}   # a shorter training
  - {name: lr5e-3_s2, method: naive, args: {swa: true, start_swa: 150, swa_energy_weight: 1000,
                                            swa_forces_weight: 100, swa_lr: 0.0005}}  # a stage two
  # the same four with the E0s refit on the training configurations afterwards (one training each, not two)
  - {name: lr5e-3_refit, method: naive, refit_offset: true}
  - {name: lr3e-3_refit, method: naive, args: {lr: 0.003}, refit_offset: true}
  - {name: lr5e-3_e100_refit, method: naive, args: {max_num_epochs: 100}, refit_offset: true}
  - {name: lr5e-3_s2_refit, method: naive, args: {swa: true, start_swa: 150, swa_energy_weight: 1000,
                                                  swa_forces_weight: 100, swa_lr: 0.0005}, refit_offset: true}
  # prototype alignment (protoalign finetune): only with --prototypes, and skipped when protoalign diagnose
  # expects no gain from it (unless --keep-alignment). λ: the history's validation choices (energy term) and
  # the middle of the selection grid (latent term) until the evidence grid has chosen
  - {name: align_1e-2, method: align, align_weight: 0.01}
  - {name: align_1, method: align, align_weight: 1}
  - {name: latent_1e-1, method: align, align_weight: 0, align_args: [--latent-weight, '0.1']}
"""
FILE_KEYS = ("mace_args", "candidates")
MAX_EPOCHS = ("--max_num_epochs",)  # spellings of mace_run_train's options, the first one canonical
START_STAGE_TWO = ("--start_swa", "--start_stage_two")
PATIENCE = ("--patience",)
BATCH_SIZE = ("--batch_size",)


@dataclasses.dataclass(frozen=True)
class CandidateSet:
    """Candidates parsed from ``source`` ('default' or a YAML path): the shared recipe ``mace_args`` and the
    ``methods``, in file order; ``data`` is what they were parsed from ({mace_args, candidates}, JSON-ready)."""

    source: str
    mace_args: tuple[str, ...]
    methods: tuple[Method, ...]
    data: dict

    def method(self, name: str) -> Method:
        """The candidate called ``name``."""
        return next(m for m in self.methods if m.name == name)


def load_candidates(source: str) -> CandidateSet:
    """The default candidates (``source`` 'default') or those of a YAML file; ProtoalignError for a bad file."""
    import yaml

    if source == DEFAULT_CANDIDATES:
        return parse_candidates(yaml.safe_load(DEFAULT_CANDIDATES_YAML), source)
    return parse_candidates(read_yaml(Path(source), "candidate file"), source)


def parse_candidates(raw, source: str) -> CandidateSet:
    """A candidate set from parsed YAML (a list of entries, or {mace_args, candidates}); ``source`` names it in
    errors. Refused: unknown keys, bad entries (the bench's own errors), duplicate names, kinds tune cannot run."""
    import yaml

    if isinstance(raw, list):
        raw = {"candidates": raw}
    if not isinstance(raw, dict):
        raise ProtoalignError(f"{source}: a candidate file holds a list of candidates or a mapping with keys "
                              f"{', '.join(FILE_KEYS)}")
    unknown = sorted(set(raw) - set(FILE_KEYS))
    if unknown:
        raise ProtoalignError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(FILE_KEYS)}")
    if not raw.get("candidates") or not isinstance(raw["candidates"], list):
        raise ProtoalignError(f"{source}: 'candidates' must be a non-empty list")
    recipe = raw.get("mace_args", yaml.safe_load(DEFAULT_CANDIDATES_YAML)["mace_args"])
    mace_args = as_args(recipe, f"{source}: mace_args")
    clash = harness_clash(mace_args)
    if clash:
        raise ProtoalignError(f"{source}: mace_args {', '.join(clash)} is set by tune; remove it")
    methods = []
    for index, entry in enumerate(raw["candidates"]):
        try:
            methods += parse_method(entry, index, "candidates").variants()
        except ProtoalignError as exc:
            raise ProtoalignError(f"{source}: {exc}") from None
    for method in methods:
        check_runnable(method, source)
    names = [m.name for m in methods]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ProtoalignError(f"{source}: candidate name(s) used twice: {', '.join(twice)}; give each a distinct 'name'")
    return CandidateSet(source, mace_args, tuple(methods), {"mace_args": list(mace_args), "candidates": raw["candidates"]})


def check_runnable(method: Method, source: str) -> None:
    """Refuse a candidate tune cannot train: one that trains nothing, restricts bench budgets or seeds, or reads
    source-domain products tune does not make (multihead replay structures, prototypes built anew)."""
    where = f"{source}: candidate {method.name}"
    if not method.trains:
        raise ProtoalignError(f"{where}: method {method.kind!r} trains nothing; tune itself chooses among candidates")
    if method.budgets is not None or method.seeds is not None:
        raise ProtoalignError(f"{where}: budgets and seeds are bench keys; tune trains once per fold, seed 0")
    if method.kind == "multihead":
        raise ProtoalignError(f"{where}: multihead replays source structures, which tune does not take; use bench")
    if isinstance(method, Align) and method.prototypes_args is not None:
        raise ProtoalignError(f"{where}: prototypes_args builds prototypes anew, which tune does not; "
                              "build them with protoalign prototypes and pass --prototypes")


def check_batch_sizes(candidates: CandidateSet, smallest_training_set: int) -> None:
    """Refuse a candidate whose mace --batch_size exceeds the smallest training set of the folds: mace drops the
    last incomplete batch of every epoch, so it would train on nothing."""
    for method in candidates.methods:
        batch_size = integer_option([*candidates.mace_args, *method.args], BATCH_SIZE, mace_default(BATCH_SIZE[0]))
        if batch_size > smallest_training_set:
            raise ProtoalignError(f"candidate {method.name}: --batch_size {batch_size}, but a fold trains on only "
                                  f"{smallest_training_set} configuration(s) and mace drops incomplete batches; give "
                                  "more configurations, a smaller validation part, or a smaller batch_size")


def is_alignment(method: Method) -> bool:
    """Whether a candidate fine-tunes with the prototype alignment (it needs --prototypes)."""
    return isinstance(method, Align)


def active_candidates(candidates: CandidateSet, has_prototypes: bool, no_gain_verdict: str | None,
                      keep_alignment: bool) -> tuple[list[Method], list[str]]:
    """The candidates that run, and one line per skipped candidate saying why.

    Alignment candidates need prototypes; with them, ``no_gain_verdict`` (diagnose's verdict line when it
    expects no gain from alignment, else None) skips them unless ``keep_alignment``.
    """
    kept, skipped = [], []
    for method in candidates.methods:
        if is_alignment(method) and not has_prototypes:
            skipped.append(f"{method.name}: an alignment candidate; skipped without --prototypes")
        elif is_alignment(method) and no_gain_verdict is not None and not keep_alignment:
            skipped.append(f"{method.name}: skipped because protoalign diagnose on the training data says "
                           f"\"{no_gain_verdict}\" (--keep-alignment runs it anyway)")
        else:
            kept.append(method)
    if not kept:
        raise ProtoalignError("no candidate left to train: " + "; ".join(skipped))
    return kept, skipped


def option_value(args: Sequence[str], spellings: Sequence[str]) -> str | None:
    """The value an option (any of its ``spellings``) has in an argument list: its last occurrence, as
    argparse reads it (``--flag value`` or ``--flag=value``); None when absent."""
    value = None
    for position, arg in enumerate(args):
        flag, equals, inline = arg.partition("=")
        if flag in spellings:
            value = inline if equals else (args[position + 1] if position + 1 < len(args) else None)
    return value


def with_option(args: Sequence[str], spellings: Sequence[str], value: str) -> list[str]:
    """``args`` with every occurrence of an option (any of its ``spellings``) set to ``value`` in place; the
    option appended in its first spelling when absent."""
    result, position, found = [], 0, False
    while position < len(args):
        flag, equals, _ = args[position].partition("=")
        if flag in spellings:
            found = True
            result += [f"{flag}={value}"] if equals else [flag, value]
            position += 1 if equals else 2
        else:
            result.append(args[position])
            position += 1
    return result if found else [*result, spellings[0], value]


def integer_option(args: Sequence[str], spellings: Sequence[str], default: int | None) -> int | None:
    """An integer option's value in an argument list (``default`` when absent); ProtoalignError if not an integer."""
    value = option_value(args, spellings)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ProtoalignError(f"{spellings[0]} must be an integer, got {value!r}") from None


@functools.cache
def mace_default(option: str) -> int:
    """mace_run_train's default of an integer option (its own parser, without importing torch)."""
    from protoalign_cli.mace.arguments import argument_parser

    return int(argument_parser().get_default(option.lstrip("-")))


def cap_epochs(args: Sequence[str], max_epochs: int, default_epochs: int, default_patience: int) -> list[str]:
    """A recipe bounded to ``max_epochs`` epochs: its max_num_epochs capped at E, its stage two's start scaled by
    E / (its max_num_epochs) (rounded, >= 1; when the recipe has a stage two and E >= 2, at most the last epoch, so
    that it keeps one), its patience capped at E.

    ``default_epochs`` and ``default_patience`` are mace_run_train's, used when the arguments omit them.
    Arguments stay in place; the capped options are appended when absent.
    """
    epochs = integer_option(args, MAX_EPOCHS, default_epochs)
    capped = min(epochs, max_epochs)
    result = with_option(args, MAX_EPOCHS, str(capped))
    start = integer_option(args, START_STAGE_TWO, None)
    if start is not None:
        scaled = max(1, round(start * capped / epochs))
        if start < epochs and capped >= 2:  # the recipe has a stage two: keep one
            scaled = min(scaled, capped - 1)
        result = with_option(result, START_STAGE_TWO, str(scaled))
    patience = integer_option(args, PATIENCE, default_patience)
    return with_option(result, PATIENCE, str(min(patience, max_epochs)))


def retrain_epochs(best_epochs: Sequence[int | None]) -> int | None:
    """Epochs of the final retrain on all configurations: the mean over folds of the best epoch (0-based, as mace
    logs it) plus one, rounded; None when no fold's best epoch is known."""
    known = [epoch for epoch in best_epochs if epoch is not None]
    if not known:
        return None
    return round(sum(known) / len(known)) + 1


def for_epochs(args: Sequence[str], epochs: int) -> list[str]:
    """A recipe that trains exactly ``epochs`` epochs: max_num_epochs and patience set to it (no early stop)."""
    return with_option(with_option(args, MAX_EPOCHS, str(epochs)), PATIENCE, str(epochs))
