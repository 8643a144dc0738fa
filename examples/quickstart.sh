#!/usr/bin/env bash
# Quickstart: the whole protoalign pipeline on the bundled toy example, offline, on a CPU (a few minutes).
#
#   bash examples/quickstart.sh [RUN_FOLDER]        (default: ./quickstart_out)
#
# examples/foundation.model is a tiny MACE trained on examples/data/source.xyz (small H/C/N/O
# molecules); we adapt it to ethanol, acetic acid and acetaldehyde: fine-tune on data/target_train.xyz,
# validate on data/target_valid.xyz, and compare the pretrained and fine-tuned models on the held-out
# frames of data/target_test.xyz. All made by examples/make_example.py. Energies are EMT toy energies.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${1:-./quickstart_out}"
mkdir -p "$RUN"
RUN="$(cd "$RUN" && pwd)"
FOUNDATION="$HERE/foundation.model"
SOURCE="$HERE/data/source.xyz"

echo "== 1/4 latents of the foundation model over its source data" >&2
protoalign extract --model "$FOUNDATION" --configs "$SOURCE" --out "$RUN/source_latents.h5" --overwrite

echo "== 2/4 per-element prototypes of those latents" >&2
protoalign prototypes "$RUN/source_latents.h5" --out "$RUN/prototypes.h5" --k 8 --overwrite

echo "== 3/4 fine-tune on the target data with the alignment term" >&2
rm -rf "$RUN/finetune"
protoalign finetune --prototypes "$RUN/prototypes.h5" -- \
    --name finetuned --seed 0 --work_dir "$RUN/finetune" \
    --foundation_model "$FOUNDATION" --multiheads_finetuning False \
    --train_file "$HERE/data/target_train.xyz" --valid_file "$HERE/data/target_valid.xyz" \
    --energy_key REF_energy --forces_key REF_forces --E0s estimated \
    --lr 1e-3 --max_num_epochs 8 --energy_weight 30 --forces_weight 100 --batch_size 8 --valid_batch_size 12 \
    --default_dtype float64 --device cpu --plot False

echo "== 4/4 pretrained vs fine-tuned on the held-out target frames" >&2
python "$HERE/compare.py" "$HERE/data/target_test.xyz" --json "$RUN/comparison.json" \
    --model "pretrained=$FOUNDATION" --model "fine-tuned=$RUN/finetune/finetuned.model"
