#!/usr/bin/env bash
# First contact with a lent GPU: install kerneltune over the image's torch/triton (no network there),
# then evaluate and time every shipped candidate on CUDA and run the tests marked gpu.
# Usage (device machine, repo root): bash benchmarks/gpu/smoke.sh   (writes under $OUT)
set -u
OUT=${OUT:-/tmp/ktout}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KERNELTUNE_CACHE_DIR=/tmp/ktcache KERNELTUNE_DB=$OUT/gpu.db
exec > >(tee -a "$OUT/smoke.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
  echo "pip install -e . failed: running from the tree"; export PYTHONPATH=$PWD
  kerneltune() { python3 -c 'import sys; from kerneltune.cli import main; sys.argv[0] = "kerneltune"; main()' "$@"; }
fi
kerneltune doctor
T0=$SECONDS
timeout 200 kerneltune bench attention --device cuda --csv "$OUT/bench.csv"
echo "attention bench rc=$? in $((SECONDS-T0)) s"; T0=$SECONDS
timeout 150 kerneltune bench adamw --device cuda --csv "$OUT/bench.csv"
echo "adamw bench rc=$? in $((SECONDS-T0)) s"; T0=$SECONDS
timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -x -p no:cacheprovider
echo "gpu tests rc=$? in $((SECONDS-T0)) s"
