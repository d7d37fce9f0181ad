#!/usr/bin/env bash
# Issue 8 on a lent H100, in ONE call of at most ~7 minutes: a short template search per op (found or confirmed
# by `kerneltune search`, each candidate through the full evaluator), then every issue-8 shape benched against
# every baseline with the device ceilings measured in the same run; CSV, plots, store and log under $OUT.
#
#   bash benchmarks/gpu/issue8.sh                       # device machine, repo root; writes under $OUT (<= 7 files)
#   SEARCH=0 BENCH_DEADLINE=330 bash benchmarks/gpu/issue8.sh   # bench only (e.g. a second call), longer
#
# Budgets (seconds, env): T_FWD=85 T_BWD=85 T_ADAM=65 (search wall limits), BENCH_DEADLINE=110 (shapes not started
# by then are recorded as skipped; the headline shapes go first), BENCH_TIMEOUT=BENCH_DEADLINE+45.
# Files: issue8.log, issue8.csv, issue8_meta.json, issue8.db, attention.png, attention_backward.png, adamw.png
set -u
OUT=${OUT:-/tmp/ktout}; mkdir -p "$OUT"
T_FWD=${T_FWD:-85}; T_BWD=${T_BWD:-85}; T_ADAM=${T_ADAM:-65}; SEARCH=${SEARCH:-1}
BENCH_DEADLINE=${BENCH_DEADLINE:-110}; BENCH_TIMEOUT=${BENCH_TIMEOUT:-$((BENCH_DEADLINE + 45))}
export PYTHONUNBUFFERED=1 KERNELTUNE_CACHE_DIR=/tmp/ktcache KERNELTUNE_DB=$OUT/issue8.db
exec > >(tee -a "$OUT/issue8.log") 2>&1
T_ALL=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1; then
  echo "pip install -e . failed: running from the tree"; export PYTHONPATH=$PWD
  kerneltune() { python3 -c 'import sys; from kerneltune.cli import main; sys.argv[0] = "kerneltune"; main()' "$@"; }
fi
search() {  # op, seconds, budget, jobs, extra args...
  local op=$1 t=$2 budget=$3 jobs=$4; shift 4; local t0=$SECONDS
  timeout -k 5 "$t" kerneltune search "$op" --device cuda --proposer templates --strategy random --seed 8 \
    --budget "$budget" --jobs "$jobs" --time "$((t - 12))s" --timeout "$((t - 5))" "$@" --json > "/tmp/search_$op.json"
  echo "search $op rc=$? in $((SECONDS - t0)) s"
  python3 - "$op" <<'PY' || true
import json, sys
try:
    s = json.load(open(f"/tmp/search_{sys.argv[1]}.json"))
    print(f"  {sys.argv[1]}: {s.get('results')} results {s.get('by_status')}; top:")
    for t in (s.get("leaderboard") or [])[:4]:
        print(f"    {t.get('name')}  {t.get('speedup') or 0:.3f}x  {t.get('median_ms') or 0:.3f} ms  {t.get('params', '')}")
except Exception as e:  # noqa: BLE001
    print(f"  {sys.argv[1]}: no summary ({e})")
PY
}
if [ "$SEARCH" = 1 ]; then
  # one headline shape per op in the search (the bench covers all 24); defaults of every template come first
  search attention "$T_FWD" 6 6 --shapes 4,16,4096,128,causal --dtype bf16
  search attention_backward "$T_BWD" 5 5 --shapes 4,16,4096,128,causal --dtype bf16
  search adamw "$T_ADAM" 3 3
  kerneltune leaderboard attention --device cuda --limit 3 || true
  kerneltune leaderboard attention_backward --device cuda --limit 3 || true
  kerneltune leaderboard adamw --device cuda --limit 3 || true
fi
T0=$SECONDS
timeout -k 5 "$BENCH_TIMEOUT" python3 benchmarks/bench_gpu.py --out "$OUT" --db "$KERNELTUNE_DB" \
  --deadline "$BENCH_DEADLINE" --compile-n 4096
echo "bench rc=$? in $((SECONDS - T0)) s"
timeout 60 python3 benchmarks/plot_gpu.py "$OUT/issue8.csv" --out "$OUT" || echo "plots: not made here (rebuild from the CSV)"
echo "issue8.sh: $((SECONDS - T_ALL)) s in all; files: $(ls "$OUT" | tr '\n' ' ')"
