#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/device/cuda_checks.sh needs on a GPU machine that has PyTorch but
# no network and none of mace's other dependencies: wheels for Python 3.12 in .whl/ (mace-torch and the packages
# it and protoalign need beyond that machine's image), and a link devshared -> ../shared through which the shared
# model and aspirin data travel (nothing is copied into the project; both paths are git-ignored locally).
#
#   bash benchmarks/device/prepare.sh
# then call the device tool's run with
#   command: bash benchmarks/device/cuda_checks.sh
#   carry:   [".whl", "devshared/models/ani500k_small_CC.model", "devshared/data/md17-pbe/aspirin.xyz"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
grep -qx "/devshared" .git/info/exclude || echo "/devshared" >> .git/info/exclude
[ -e devshared ] || ln -s ../shared devshared
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    mace-torch==0.3.16 e3nn==0.4.4 ase==3.29.0 faiss-cpu==1.15.1 torch-ema==0.3 matscipy==1.3.1 \
    configargparse gitpython gitdb smmap lmdb orjson prettytable wcwidth
# python-hostlist (imported by mace's run_train) has no wheel on the index here: its single module travels as it is
# (cuda_checks.sh copies it into site-packages)
cp "$(ls .venv/lib/python3*/site-packages/hostlist.py | head -1)" .whl/
ls .whl
du -sh .whl
