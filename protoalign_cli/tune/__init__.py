"""``protoalign tune``: the best model a user's labels can give, chosen on their own data, and why.

Candidates (recipes in the bench's method syntax; a default set from the recipe grid) are trained on the
user's training configurations and compared on validation configurations held out in contiguous blocks:
one block (``--valid-fraction``, default), a file (``--valid``), or K folds (``--folds``; the winner is then
trained again on every configuration). The lowest score of the criterion (``choose.criterion_score``) wins;
its model is OUT/best.model, and report.md says why.

Each (candidate training, fold) is one task: trained with ``mace_run_train`` (or ``protoalign finetune``)
in OUT/candidates/<name>/<fold>/, evaluated in float64 on the fold's validation configurations, and
finished by a done.json whose fingerprint (command and file contents) makes a rerun skip it.

Modules: settings (the options, tune.json and the "other settings" check), candidates (the default set, user
files, --max-epochs), data (split math, input checks, split files), plan (folders, tasks, their commands and
fingerprints), task (one task: train, evaluate, done.json), run (preparing, running tasks locally or as a SLURM
array, the final retrain, best.model), choose (the criterion and the ranking), summary (what the report says
beyond the records: validation scheme, reproducing command, provenance), report (report.md/.json, curves).
This module holds only the defaults the command line shows, so that importing it is instant.
"""

from __future__ import annotations

DEFAULT_VALID_FRACTION = 0.2
DEFAULT_ENERGY_WEIGHT = 1.0
DEFAULT_FORCES_WEIGHT = 1.0
DEFAULT_ENERGY_KEY = "REF_energy"
DEFAULT_FORCES_KEY = "REF_forces"
DEFAULT_CANDIDATES = "default"
