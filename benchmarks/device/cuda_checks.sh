#!/usr/bin/env bash
# The CUDA checks of protoalign, as one script for a GPU machine (the device tool; see prepare.sh for the wheels
# and data it needs, and the command that starts it). Each step has its own time limit, so that one hang cannot
# take the whole lease; everything is logged to $OUT/checks.log. About 5-8 minutes on one GPU.
#   1 extract --device cuda (and cpu: the two latents compared)   2 prototypes
#   3 finetune --device cuda with λ > 0                             4 the same under torchrun DDP (one rank)
#   5 tune --device cuda (two candidates, 3 epochs)
#   6 epoch time of plain fine-tuning of the shared ANI-CC model on aspirin N = 50 (float64), cuda vs cpu
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT="${OUT:-cuda_checks_out}"; mkdir -p "$OUT"
exec > >(tee "$OUT/checks.log") 2>&1
W=$(mktemp -d)  # work folder of the checks
EX=examples; DATA=$EX/data
step() {  # step NAME SECONDS COMMAND...: run with a limit, report exit status and wall time
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local start=$(date +%s.%N)
    timeout "$limit" "$@"; local status=$?
    printf '== %s: exit %s, %.1f s\n' "$name" "$status" "$(echo "$(date +%s.%N) - $start" | bc)"
}
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step install 240 bash -c "python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl \
    && cp .whl/hostlist.py \$(python3 -c 'import site; print(site.getsitepackages()[0])') \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e ."
git rev-parse HEAD 2>/dev/null; python3 -c "import mace, protoalign_cli; print('mace', mace.__version__)"

step extract-cuda 120 protoalign extract --model $EX/foundation.model --configs $DATA/source.xyz --out $W/lat_cuda.h5 --device cuda
step extract-cpu 120 protoalign extract --model $EX/foundation.model --configs $DATA/source.xyz --out $W/lat_cpu.h5 --device cpu
python3 - "$W" <<'PY'
import sys, h5py, numpy as np
w = sys.argv[1]
with h5py.File(f"{w}/lat_cuda.h5") as a, h5py.File(f"{w}/lat_cpu.h5") as b:
    for name in ("latent", "node_energy"):
        x, y = a[name][()], b[name][()]
        print(f"extract {name}: shape {x.shape}, max |cuda - cpu| = {np.max(np.abs(x - y)):.3g}")
PY
step prototypes 120 protoalign prototypes $W/lat_cuda.h5 --out $W/proto.h5 --k 8

MACE_ARGS=(--seed 0 --foundation_model $EX/foundation.model --multiheads_finetuning False
           --train_file $DATA/target_train.xyz --valid_file $DATA/target_valid.xyz --energy_key REF_energy
           --forces_key REF_forces --E0s estimated --lr 1e-3 --max_num_epochs 8 --energy_weight 30 --forces_weight 100
           --batch_size 8 --valid_batch_size 12 --default_dtype float64 --plot False)
step finetune-cuda 240 protoalign finetune --prototypes $W/proto.h5 --align-weight 0.1 --latent-weight 0.1 -- \
    --name ft --work_dir $W/ft_cuda "${MACE_ARGS[@]}" --device cuda
step finetune-ddp 300 torchrun --standalone --nproc_per_node 1 -m protoalign_cli.cli finetune --prototypes $W/proto.h5 \
    --align-weight 0.1 --latent-weight 0.1 -- --name ft --work_dir $W/ft_ddp "${MACE_ARGS[@]}" --device cuda \
    --distributed --launcher torchrun
for run in ft_cuda ft_ddp; do
    echo "$run: $(grep -h 'Loaded Stage one model' $W/$run/logs/*.log | tail -1)"; ls $W/$run/ft*.model 2>/dev/null
done
MODELS=(--model "pretrained=$EX/foundation.model")
for run in ft_cuda ft_ddp; do [ -f $W/$run/ft.model ] && MODELS+=(--model "$run=$W/$run/ft.model"); done
python3 $EX/compare.py $DATA/target_test.xyz "${MODELS[@]}"

cat > $W/candidates.yaml <<'YAML'
mace_args: [--E0s, estimated, --lr, '0.001', --batch_size, '8', --max_num_epochs, '3', --default_dtype, float64]
candidates:
  - {name: plain, method: naive}
  - {name: plain_refit, method: naive, refit_offset: true}
  - {name: align, method: align, align_weight: 0.1}
YAML
step tune-cuda 300 protoalign tune --foundation-model $EX/foundation.model --train $DATA/target_train.xyz \
    --prototypes $W/proto.h5 --keep-alignment --candidates $W/candidates.yaml --energy-key REF_energy \
    --forces-key REF_forces --jobs 2 --device cuda --out $W/tune
head -30 $W/tune/report.md 2>/dev/null

if [ -f devshared/models/ani500k_small_CC.model ] && [ -f devshared/data/md17-pbe/aspirin.xyz ]; then
    python3 - "$W" <<'PY'
import sys, ase.io
w = sys.argv[1]
frames = ase.io.read("devshared/data/md17-pbe/aspirin.xyz", ":")
ase.io.write(f"{w}/aspirin_train.xyz", frames[0:400:8])     # 50 frames of the bench's pool
ase.io.write(f"{w}/aspirin_valid.xyz", frames[400:480:2])   # the bench's validation frames
PY
    for device in cuda cpu; do
        step "epochs-$device" 300 mace_run_train --name asp --seed 0 --work_dir $W/asp_$device \
            --foundation_model devshared/models/ani500k_small_CC.model --multiheads_finetuning False \
            --train_file $W/aspirin_train.xyz --valid_file $W/aspirin_valid.xyz --energy_key REF_energy \
            --forces_key REF_forces --E0s estimated --lr 0.005 --ema --ema_decay 0.99 --batch_size 5 \
            --max_num_epochs 6 --default_dtype float64 --device $device
        grep -h "Epoch" $W/asp_$device/logs/*.log | grep -v debug | tail -3
    done
else
    echo "devshared/ not carried: epoch timing on the shared model skipped"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
