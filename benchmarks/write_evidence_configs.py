"""Write the four evidence-grid configs of issue 13 (benchmarks/configs/*_anicc_evidence*.yaml) from the recipe
and the settings the selection grid (aspirin_anicc_select.yaml) chose on validation.

    python benchmarks/write_evidence_configs.py LR ENERGY_LAMBDA PROTOTYPE_LAMBDA PRETRAINED_LAMBDA LORA_RANK FREEZE
    e.g. python benchmarks/write_evidence_configs.py 0.005 0.01 0.1 0.1 4 5

LR: the recipe's learning rate; ENERGY_LAMBDA: --align-weight of energy alignment; PROTOTYPE_LAMBDA and
PRETRAINED_LAMBDA: --latent-weight of latent alignment towards the prototype centroid (a) and the pretrained latents
(b); LORA_RANK (alpha = 2 x rank); FREEZE: mace's --freeze. Every config carries the recipe as `args: *recipe` over
the short-recipe mace_args, as the recipe and selection grids do, so that identical trainings are reused.
mace's multihead replay (aspirin N = 10) has a config of its own: it replays 20 source frames per molecule (100),
as setting 2's multihead did, where the other grids extract 200 per molecule for the prototypes (replaying 1,000
would make each epoch ~20 times as long).
"""
import sys
from pathlib import Path

if len(sys.argv) != 7:
    sys.exit(__doc__)
LR = sys.argv[1]
CHOICE = dict(energy=sys.argv[2], proto=sys.argv[3], pre=sys.argv[4], rank=int(sys.argv[5]), freeze=int(sys.argv[6]))
CONFIGS = Path(__file__).resolve().parent / "configs"
HEADER = """# Issue 13, step 4: the evidence grid, {what}.
# Methods: plain fine-tuning with the converged recipe (naive) and
# {methods_sentence}.
# Each regulariser's setting was chosen on the validation set only, at aspirin N = 25, seed 0
# (aspirin_anicc_select.yaml; docs/results.md). Recipe: lr {lr}, 200 epochs, patience 30, EMA 0.99, batch 5,
# --E0s estimated, float64 (aspirin_anicc_recipe.yaml); carried as `args: *recipe` over the short-recipe mace_args so
# that trainings identical to those of the recipe, selection and tune-comparison grids are reused, not repeated.
# Run from the repository root (resumable; finished runs are kept, committed ones are reused):
#   protoalign bench benchmarks/configs/{name}.yaml --out bench_runs/{name} --jobs 2
name: {name}
foundation_model: ../../../shared/models/ani500k_small_CC.model
device: cpu
source:
  # the five xTB small molecules, {configs_per_file} evenly spaced frames of each
  structures:
    - ../../../shared/data/md17-xtb/benzene.xyz
    - ../../../shared/data/md17-xtb/ethanol.xyz
    - ../../../shared/data/md17-xtb/malonaldehyde.xyz
    - ../../../shared/data/md17-xtb/toluene.xyz
    - ../../../shared/data/md17-xtb/uracil.xyz
  configs_per_file: {configs_per_file}
  prototypes_args: []
target:
  files: ../../../shared/data/md17-pbe/{molecule}.xyz
  energy_key: REF_energy
  forces_key: REF_forces
split:
{split}
budgets: {budgets}
seeds: {seeds}
reuse_runs_from: [{reuse}../results/aspirin_anicc_recipe, ../results/aspirin_anicc_select, ../results/{name}]
mace_args: ["--E0s", "estimated", "--lr", "0.001", "--ema", "--ema_decay", "0.99", "--batch_size", "5",
            "--max_num_epochs", "30", "--patience", "10", "--default_dtype", "float64"]
methods:
  - {{name: naive, method: naive, args: &recipe {{lr: {lr}, max_num_epochs: 200, patience: 30}}}}
{methods}
"""
REGULARISERS = """  - {{name: naive-refit, method: naive, refit_offset: true, args: *recipe}}
  - {{name: energy, method: align, align_weight: {energy}, args: *recipe}}
  - {{name: latent-proto, method: align, align_weight: 0, align_args: [--latent-weight, "{proto}"], args: *recipe}}
  - {{name: latent-pre, method: align, align_weight: 0, align_args: [--latent-weight, "{pre}", --latent-target, pretrained], args: *recipe}}
  - {{name: lora, method: lora, args: {{lr: {lr}, max_num_epochs: 200, patience: 30, lora_rank: {rank}, lora_alpha: {alpha}}}}}
  - {{name: freeze, method: freeze, freeze: {freeze}, args: *recipe}}"""
ASPIRIN_SPLIT = """  pool: [0, 400]
  valid: [400, 480]
  valid_stride: 2
  test: [560, 800]"""
SHORT_SPLIT = """  pool: [0, 200]        # first half of the 400-frame trajectory
  valid: [200, 240]     # the next 10 % (40 frames)
  test: [280, 400]      # the last 30 %, after a gap of 40 frames (400 fs)"""
MULTIHEAD = """  # mace's multihead replay: the source frames above, labelled by the foundation model, replayed beside the target
  - {name: multihead, method: multihead, args: *recipe}"""
grids = [
    # (name, molecule, what, split, budgets, seeds, methods, source frames per molecule)
    ("aspirin_anicc_evidence", "aspirin", "aspirin, N = 10 and 25, five seeds", ASPIRIN_SPLIT, "[10, 25]",
     "[0, 1, 2, 3, 4]", REGULARISERS, 200),
    ("aspirin_anicc_evidence_multihead", "aspirin", "aspirin, N = 10, five seeds: mace's multihead replay",
     ASPIRIN_SPLIT, "[10]", "[0, 1, 2, 3, 4]", MULTIHEAD, 20),
    ("aspirin_anicc_evidence_n50", "aspirin", "aspirin, N = 50, three seeds", ASPIRIN_SPLIT, "[50]", "[0, 1, 2]",
     REGULARISERS, 200),
    ("salicylic_anicc_evidence", "salicylic_acid", "salicylic acid, N = 25, three seeds", SHORT_SPLIT, "[25]",
     "[0, 1, 2]", REGULARISERS, 200),
    ("naphthalene_anicc_evidence", "naphthalene", "naphthalene, N = 25, three seeds", SHORT_SPLIT, "[25]",
     "[0, 1, 2]", REGULARISERS, 200),
]
SENTENCES = {REGULARISERS: "the same + offset refit, energy alignment, latent alignment towards (a) the nearest source\n"
                           "# prototype's centroid and (b) the atom's own pretrained latents, LoRA, freezing",
             MULTIHEAD: "mace's multihead replay of the 100 source frames below (the regularisers' runs at this N are\n"
                        "# in aspirin_anicc_evidence.yaml)"}
for name, molecule, what, split, budgets, seeds, methods, per_file in grids:
    method_lines = methods.format(lr=LR, alpha=2 * CHOICE["rank"], **CHOICE) if methods is REGULARISERS else methods
    reuse = {"aspirin_anicc_evidence": "../results/aspirin_anicc_tune_compare, ",
             "aspirin_anicc_evidence_multihead": "../results/aspirin_anicc_evidence, "}.get(name, "")
    text = HEADER.format(what=what, methods_sentence=SENTENCES[methods], lr=LR, name=name, molecule=molecule, split=split, budgets=budgets,
                         seeds=seeds, methods=method_lines, configs_per_file=per_file, reuse=reuse)
    (CONFIGS / f"{name}.yaml").write_text(text.rstrip("\n") + "\n")
    print("wrote", name)
