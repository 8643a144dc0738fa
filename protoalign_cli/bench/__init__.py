"""``protoalign bench``: a grid of fine-tuning runs (methods x budgets x seeds) and its summary.

One YAML file names the foundation model, the source domain (prototypes, or structures to build
them from), the target data with a time-separated frame split, the budgets N, the seeds, the
mace_run_train hyperparameters shared by every run, and the methods. Every method sees the same
training subset, validation set, test set, seed and hyperparameters: split files are written once
per (N, seed) and reused.

Each run trains with ``mace_run_train`` (or ``protoalign finetune``), then evaluates the model
mace writes (``<name>.model``: the checkpoint with the lowest validation loss, EMA weights when
``--ema``; ``<name>_stagetwo.model`` after a stage two) in float64 on the test and validation sets. A finished run leaves ``done.json`` with its
metrics and is never redone. Energies in eV in files, errors reported in meV, meV/atom and meV/Å.

Modules: config (YAML -> BenchConfig), methods (one module per method kind, and their registry),
data (target frames, splits), source (source products), command (how programs are run), layout
(folders, training commands, done.json, locks, fingerprints, reuse), evaluate (errors of a finished model), schedule
(local and SLURM execution), report (runs.csv, summary.md, learning_curve.png), stats (pure math).
This module holds only the defaults that the command line shows, so that importing it is instant.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_JOBS = 1
DEFAULT_OUT_ROOT = Path("bench_runs")
