"""Stage 4: can a target trust the prototypes? Coverage, energy consistency and spread.

Units: energies in eV inside the code, meV in the report where it says so; distances in the
prototypes' standardized feature space (the units of ``prototypes.assignment.assign``).

Definitions (docs/diagnose.md explains them at length):

- distance ratio of a target atom: its distance to the nearest prototype of its element divided by
  that prototype's radius (the 95th percentile of the source members' distances). Atoms of an
  element without prototypes have ratio ``inf``.
- covered: ratio <= ``radius_factor``; coverage = fraction of target atoms covered. With
  ``radius_factor`` 1 about 5 % of the *source* members themselves are outside (by the definition
  of the radius); the default 1.5 tolerates that tail, so that a target like the source reads 1.
- prototype predictor of a configuration: E_pred = sum_i (E0_Z(i) + eps*_p(i)), eps*_p the mean
  energy-minus-E0 of prototype p's source members. It is compared with reference energies after
  per-element offsets fitted by least squares on the residual (the same correction for the
  composition-only baseline, sum_i E0_Z(i), and for the pretrained model's own total energy).
- per-atom agreement: eps_i (a model's atom energy minus that model's own E0) against eps*_p(i);
  "bias" is the per-element mean of eps_i - eps*_p(i) (for a fine-tuned model it includes its
  re-estimated E0s), "mae" the mean |eps_i - eps*_p(i) - bias| in meV. The "scatter ratio"
  divides the RMS of eps_i - eps*_p(i) - bias by the RMS member energy std of the assigned
  prototypes, which is what that RMS is for the source atoms themselves: 1 means target atoms
  sit around their prototype energies as the source members do; much more than 1 means latent
  neighbours do not have comparable energies, and pulling towards eps* is a bias.
- spread: prototypes whose member energy std exceeds a threshold are flagged.

Layout: ``stats`` (pure statistics), ``context`` (what diagnostics compute from), ``diagnostics``
(``base``: what every result offers; one module per report section; the registry ``DIAGNOSTICS``),
``figures`` (matplotlib figures from arrays; ``source_atoms`` samples the source for the map),
``results`` (the results gathered, and the verdict), ``report`` (report.json / report.md), ``run``
(orchestration), ``settings`` (choices, defaults, thresholds). Imports go one way: run → report →
results → diagnostics → figures → source_atoms, stats, settings; context below the diagnostics.
"""

from protoalign_cli.diagnose.run import DiagnoseRequest, run_diagnose

__all__ = ["DiagnoseRequest", "run_diagnose"]
