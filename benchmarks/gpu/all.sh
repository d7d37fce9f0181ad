#!/usr/bin/env bash
# Every open GPU check in ONE call of at most ~9.5 minutes on a lent H100 (device time is short: one start).
#   1. issue 8: a short template search per op (attention at the issue's headline shape and at GPT-2 small's
#      training shape, attention_backward likewise, adamw on GPT-2 small's parameters);
#   2. each op's best passed candidate promoted into a scratch registry (only where it beats the primary
#      baseline), which the training run then uses through $KERNELTUNE_REGISTRY;
#   3. issue 7: `kerneltune train --compare --preset gpt2-124m` (reference vs tuned, same seed and batches);
#   4. the Landlock diagnosis (a few seconds);
#   5. issue 8: every shape benched against every baseline, ceilings in the same run, until the deadline.
# Each phase's files are packed into one tarball under $OUT as soon as it ends (the device returns 8 files):
#   all.log, search.tgz (store, search JSON, scratch registry + promoted files), train.tgz, bench.tgz (CSV, meta,
#   PNGs), landlock.txt
# Usage (device machine, repo root): bash benchmarks/gpu/all.sh     TOTAL=560 sets the whole budget (seconds).
set -u
OUT=${OUT:-/tmp/ktout}; mkdir -p "$OUT"
TOTAL=${TOTAL:-560}; T_FWD=${T_FWD:-70}; T_BWD=${T_BWD:-70}; T_ADAM=${T_ADAM:-45}; STEPS=${STEPS:-60}
W=/tmp/ktw; rm -rf "$W"; mkdir -p "$W/search" "$W/train" "$W/bench" "$W/registry"
export PYTHONUNBUFFERED=1 KERNELTUNE_CACHE_DIR=/tmp/ktcache KERNELTUNE_DB=$W/search/store.db
exec > >(tee -a "$OUT/all.log") 2>&1
T_ALL=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 && command -v kerneltune >/dev/null; then
  KT=(kerneltune)
else
  echo "pip install -e . failed: running from the tree"; export PYTHONPATH=$PWD; KT=(python3 -m kerneltune.cli)
fi
echo "install: $((SECONDS - T_ALL)) s"

search() {  # op, seconds, budget, extra args...
  local op=$1 t=$2 budget=$3; shift 3; local t0=$SECONDS
  timeout -k 5 "$t" "${KT[@]}" search "$op" --device cuda --proposer templates --strategy random --seed 8 \
    --budget "$budget" --jobs "$budget" --time "$((t - 12))s" --timeout "$((t - 5))" "$@" --json > "$W/search/$op.json"
  echo "search $op rc=$? in $((SECONDS - t0)) s"
  python3 - "$W/search/$op.json" "$W/search/$op.best" <<'PY' || true
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"  no summary ({e})"); sys.exit(0)
print(f"  {s.get('results')} results {s.get('by_status')}; top:")
top = s.get("top") or []
for t in top[:4]:
    print(f"    {t.get('name')}  {t.get('speedup') or 0:.3f}x  {t.get('median_ms') or 0:.3f} ms  {t.get('params', '')}")
if top and (top[0].get("speedup") or 0) > 1.0:
    open(sys.argv[2], "w").write(top[0]["name"])
PY
}
search attention "$T_FWD" 6 --shapes 4,16,4096,128,causal --shapes 16,12,1024,64,causal --dtype bf16
search attention_backward "$T_BWD" 5 --shapes 4,16,4096,128,causal --shapes 16,12,1024,64,causal --dtype bf16
search adamw "$T_ADAM" 3
export KERNELTUNE_REGISTRY=$W/registry/registry.json
for op in attention attention_backward adamw; do
  if [ -s "$W/search/$op.best" ]; then
    timeout 30 "${KT[@]}" promote "$(cat "$W/search/$op.best")" --device cuda --registry "$KERNELTUNE_REGISTRY" || true
  else
    echo "promote $op: nothing beat the primary baseline in the search"
  fi
done
[ -f "$KERNELTUNE_REGISTRY" ] || unset KERNELTUNE_REGISTRY
timeout 20 "${KT[@]}" registry || true
tar -czf "$OUT/search.tgz" -C "$W" search registry
echo "phase search+promote done at $((SECONDS - T_ALL)) s"

T0=$SECONDS
timeout 130 "${KT[@]}" train --compare --preset gpt2-124m --device cuda --steps "$STEPS" --out "$W/train/out"
echo "train compare rc=$? in $((SECONDS - T0)) s (0: losses agree within tolerance, 1: they do not)"
tar -czf "$OUT/train.tgz" -C "$W" train
unset KERNELTUNE_REGISTRY

timeout 25 python3 benchmarks/gpu/landlock_probe.py > "$OUT/landlock.txt" 2>&1; echo "landlock probe rc=$?"; cat "$OUT/landlock.txt"

LEFT=$((TOTAL - (SECONDS - T_ALL) - 75))
[ "$LEFT" -lt 40 ] && LEFT=40
echo "bench deadline $LEFT s"
T0=$SECONDS
timeout -k 5 "$((LEFT + 40))" python3 benchmarks/bench_gpu.py --out "$W/bench" --db "$KERNELTUNE_DB" \
  --deadline "$LEFT" --compile-n 4096
echo "bench rc=$? in $((SECONDS - T0)) s"
tar -czf "$OUT/bench.tgz" -C "$W" bench
timeout 25 python3 benchmarks/plot_gpu.py "$W/bench/issue8.csv" --out "$W/bench" || echo "plots: not made here (rebuild from the CSV)"
tar -czf "$OUT/bench.tgz" -C "$W" bench
echo "all.sh: $((SECONDS - T_ALL)) s in all; files: $(ls "$OUT" | tr '\n' ' ')"
