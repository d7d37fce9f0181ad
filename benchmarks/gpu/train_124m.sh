#!/usr/bin/env bash
# GPT-2 small (124M) on one GPU: `kerneltune train --compare`, reference (torch SDPA + fused AdamW) against
# the tuned kernels from kerneltune's registry, same seed and batches, in lockstep; bf16 autocast.
# Writes under $OUT: train_124m.log (everything), train_124m/compare.json and compare.png.
# Budget: about 2 minutes of the GPU after install (STEPS=100: ~0.1 s a step per model), 4 at most.
# Usage (device machine, repo root): bash benchmarks/gpu/train_124m.sh   [STEPS=100 bash ... to change]
set -u
OUT=${OUT:-/tmp/ktout}; mkdir -p "$OUT"
STEPS=${STEPS:-100}
export PYTHONUNBUFFERED=1 KERNELTUNE_CACHE_DIR=/tmp/ktcache
exec > >(tee -a "$OUT/train_124m.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
  echo "pip install -e . failed: running from the tree"; export PYTHONPATH=$PWD
fi
T0=$SECONDS
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_gpu_train.py
echo "gpu train test rc=$? in $((SECONDS-T0)) s"; T0=$SECONDS
timeout 170 python3 -m kerneltune.cli train --compare --preset gpt2-124m --device cuda --steps "$STEPS" --out "$OUT/train_124m"
echo "compare rc=$? in $((SECONDS-T0)) s (0: losses agree within tolerance, 1: they do not)"
