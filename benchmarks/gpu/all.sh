#!/usr/bin/env bash
# Every open GPU check in ONE call of about TOTAL seconds (default 520) on a lent Hopper GPU (H100 or H200). Phases, run in the
# order PHASES names them (default "adamw train bench attn"), after `kerneltune doctor` (which sandbox
# layers CUDA runs under on this host):
#   adamw  `kerneltune search adamw` on GPT-2 small's parameters (each candidate through the full evaluator;
#          two at once; ADAM_ONLY="triton_mt_table ...": those templates only; after a bench phase that timed
#          AdamW variants, the fastest one that beat the candidate is a third, evaluated first:
#          benchmarks/gpu/bench_best.py; ADAM_START="triton_mt_table:CHUNK=32768;...": these points first
#          instead, ADAM_BUDGET of them at once, default 3), then its best candidate promoted into a scratch registry when it
#          beats torch's fused AdamW;
#   train  issue 7: `kerneltune train --compare --preset gpt2-124m`, the tuned run taking that registry
#          through $KERNELTUNE_REGISTRY (reference vs tuned, same seed and batches); TRAIN_IF_PROMOTED=1
#          skips it when the adamw phase promoted nothing (the fallback's cost is measured already);
#   optim  one optimizer step of GPT-2 small, torch's fused AdamW vs kerneltune.optim.AdamW (benchmarks/
#          optim_step.py: device and host time per step; into train.tgz as optim_step[-scratch]-N.json, N
#          counting the optim phases of the call: name it several times for several processes);
#   parts  the AdamW template's run() part by part (benchmarks/gpu/adamw_host_parts.py: checks, addresses,
#          table, launch; into train.tgz);
#   host   kerneltune.optim's host side a step against torch's fused AdamW's, each kernel a no-op (benchmarks/
#          optim_host.py --torch --template: the template's run and run_unchecked, launches left out; into train.tgz);
#   fallback  kerneltune.attention's backward where no backward kernel serves, SDPA's own (forward recomputed)
#          against the exact fp32 one, bf16 (benchmarks/attention_fallback_bwd.py; into train.tgz);
# train and optim serve from the scratch registry when an earlier adamw phase promoted into it (else the
# shipped one); bench, tests and attn never see it.
#   bench  issue 8: every shape benched against every baseline, ceilings in the same run (bench_gpu.py;
#          BENCH_ARGS passes more arguments, e.g. --only-n 512,1024,2048; BENCH_S caps its deadline);
#   tests  the tests marked gpu (T_TESTS seconds, default 300), the evaluator's slow seed test left out (the
#          adamw phase runs the same evaluator at full size), as TEST_SHARDS pytest processes at once (default
#          8; one at a time they needed about 540 s on the H100: Triton compiles every knob set on one core);
#   attn   `kerneltune search $ATTN_OP` (attention, or attention_backward) with the time left (Triton compiles every check case's
#          specialisation: a candidate needs well over a minute, so ATTN_BUDGET candidates, default 8, are
#          evaluated at once: their compiles and checks run in parallel on the host's cores, their timings
#          one at a time under the evaluator's device lock); ATTN_ONLY (default "triton_fa2", for the backward
#          "triton_fa2_bwd"; empty: every candidate of the op): the templates searched;
#          ATTN_START="triton_fa2:KNOB=V,...;...": points evaluated first; unset, the best variant of the bench
#          run in ATTN_BENCH_DIR (default: this call's bench phase; a bench.tgz unpacked: its bench/ folder) that
#          beat the candidate there (benchmarks/gpu/bench_best.py). ATTN_SHAPES="B,H,N,D,causal|full;...": the
#          shapes each candidate is timed at (bf16; every one a registry bucket when promoted, the losers too).
# Each phase's files are packed into one tarball under $OUT as soon as it ends (the device returns 8 files):
#   all.log, search.tgz (store, search JSON, scratch registry + promoted files), train.tgz, bench.tgz (CSV,
#   meta, PNGs), search_attn.tgz, tests.tgz (a log per shard, summary.json); while the bench runs, its rows so
#   far are bench-partial.csv (what comes back when the device's time limit ends the call mid-bench)
# Usage (device machine, repo root): bash benchmarks/gpu/all.sh   [TOTAL=520 T_ADAM=200 T_ATTN=150 STEPS=60]
#   PHASES="bench adamw train" BENCH_ARGS="--only-n 512,1024,2048 --compile-n 1024" bash benchmarks/gpu/all.sh
# Afterwards, here: promote the AdamW winner from the returned store into the shipped registry with
#   kerneltune promote NAME --device-key cuda:nvidia-h100-80gb-hbm3:sm90 --db <search.tgz>/search/store.db
#   (on an H200: --device-key cuda:nvidia-h200:sm90; the key all.log's `kerneltune registry` shows)
set -u
OUT=${OUT:-/tmp/ktout}; mkdir -p "$OUT"
TOTAL=${TOTAL:-520}; T_ADAM=${T_ADAM:-200}; T_ATTN=${T_ATTN:-150}; STEPS=${STEPS:-60}
PHASES=${PHASES:-adamw train bench attn}; ADAM_ONLY=${ADAM_ONLY:-}; BENCH_S=${BENCH_S:-600}
ATTN_OP=${ATTN_OP:-attention}; ATTN_BUDGET=${ATTN_BUDGET:-8}
ATTN_SHAPES=${ATTN_SHAPES:-4,16,4096,128,causal;16,12,1024,64,causal}
if [ "$ATTN_OP" = attention ]; then ATTN_ONLY=${ATTN_ONLY-triton_fa2}; else ATTN_ONLY=${ATTN_ONLY-triton_fa2_bwd}; fi
W=/tmp/ktw; rm -rf "$W"; mkdir -p "$W/search" "$W/train" "$W/bench" "$W/registry" "$W/tests"
export PYTHONUNBUFFERED=1 KERNELTUNE_CACHE_DIR=/tmp/ktcache KERNELTUNE_DB=$W/search/store.db
exec > >(tee -a "$OUT/all.log") 2>&1
T_ALL=$SECONDS
left() { echo $((TOTAL - (SECONDS - T_ALL))); }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 && command -v kerneltune >/dev/null; then
  KT=(kerneltune)
else
  echo "pip install -e . failed: running from the tree"; export PYTHONPATH=$PWD; KT=(python3 -m kerneltune.cli)
fi
echo "install: $((SECONDS - T_ALL)) s"
timeout 60 "${KT[@]}" doctor 2>&1 | grep -i -E "sandbox|landlock|turns alone" || true

search() {  # op, seconds (whole search), budget, seconds per candidate, extra args...
  local op=$1 t=$2 budget=$3 tc=$4; shift 4; local t0=$SECONDS
  timeout -k 5 "$t" "${KT[@]}" search "$op" --device cuda --proposer templates --strategy random --seed 8 \
    --budget "$budget" --jobs "$budget" --time "$((t - 8))s" --timeout "$tc" "$@" --json > "$W/search/$op.json"
  echo "search $op rc=$? in $((SECONDS - t0)) s"
  python3 - "$W/search/$op.json" "$W/search/$op.best" <<'PY' || true
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"  no summary ({e})"); sys.exit(0)
print(f"  {s.get('results')} results {s.get('by_status')}; top:")
top = s.get("leaderboard") or []
for t in top[:4]:
    print(f"    {t.get('name')}  {t.get('speedup') or 0:.3f}x  {t.get('median_ms') or 0:.3f} ms  {t.get('params', '')}")
if top and (top[0].get("speedup") or 0) > 1.0:
    open(sys.argv[2], "w").write(top[0]["name"])
PY
}

only() {  # op, template names: a folder holding those templates only (a search over them alone)
  local op=$1; shift; local d=$W/cands/$op; mkdir -p "$d"
  for t in "$@"; do cp "candidates/$op/$t.py" "$d/"; done
  echo "$d"
}

phase_adamw() {
  local cands=candidates/adamw start=""
  [ -n "$ADAM_ONLY" ] && cands=$(only adamw $ADAM_ONLY)
  # after a bench phase: its fastest AdamW variant (--also) is the search's first point, through the evaluator
  # ADAM_START="TEMPLATE:KNOB=V,...;...": points evaluated first, given
  start=${ADAM_START:-}
  [ -z "$start" ] && [ -s "$W/bench/issue8_meta.json" ] && start=$(python3 benchmarks/gpu/bench_best.py "$W/bench" adamw "$cands")
  if [ -n "$start" ]; then
    echo "adamw search starts at: $start"
    search adamw "$T_ADAM" "${ADAM_BUDGET:-3}" $((T_ADAM - 15)) --candidates "$cands" --option "start=$start"
  else
    search adamw "$T_ADAM" 2 $((T_ADAM - 15)) --candidates "$cands"
  fi
  export KERNELTUNE_REGISTRY=$W/registry/registry.json
  if [ -s "$W/search/adamw.best" ]; then
    timeout 30 "${KT[@]}" promote "$(cat "$W/search/adamw.best")" --device cuda --registry "$KERNELTUNE_REGISTRY" || true
  else
    echo "promote adamw: nothing beat the primary baseline in the search"
  fi
  [ -f "$KERNELTUNE_REGISTRY" ] || unset KERNELTUNE_REGISTRY
  timeout 20 "${KT[@]}" registry || true
  tar -czf "$OUT/search.tgz" -C "$W" search registry
  echo "phase search+promote done at $((SECONDS - T_ALL)) s"
}

phase_train() {
  if [ -n "${TRAIN_IF_PROMOTED:-}" ] && [ -z "${KERNELTUNE_REGISTRY:-}" ]; then
    echo "train compare: skipped, nothing promoted"; return
  fi
  T0=$SECONDS
  timeout 100 "${KT[@]}" train --compare --preset gpt2-124m --device cuda --steps "$STEPS" --out "$W/train/out"
  echo "train compare rc=$? in $((SECONDS - T0)) s (0: losses agree within tolerance, 1: they do not)"
  tar -czf "$OUT/train.tgz" -C "$W" train
}

OPTIM_N=0
phase_optim() {  # each run its own process and file: the host's speed varies between processes
  mkdir -p "$W/train"; OPTIM_N=$((OPTIM_N + 1))
  local f="$W/train/optim_step${KERNELTUNE_REGISTRY:+-scratch}-$OPTIM_N.json"  # after a promotion: -scratch
  timeout 120 python3 benchmarks/optim_step.py --device cuda --json > "$f"
  echo "optim step rc=$?"; cat "$f"
  tar -czf "$OUT/train.tgz" -C "$W" train
}

phase_parts() {  # the AdamW template's run() part by part, as it is in the tree (benchmarks/gpu/adamw_host_parts.py)
  mkdir -p "$W/train"
  timeout 90 python3 benchmarks/gpu/adamw_host_parts.py candidates/adamw/triton_mt_table.py > "$W/train/adamw-host-parts.json"
  echo "adamw host parts rc=$?"; cat "$W/train/adamw-host-parts.json"
  tar -czf "$OUT/train.tgz" -C "$W" train
}

phase_host() {  # both optimizers' host side a step, each kernel a no-op (benchmarks/optim_host.py --torch --template)
  mkdir -p "$W/train"
  timeout 45 python3 benchmarks/optim_host.py --device cuda --no-count-adds --torch --rounds 15 \
    --template candidates/adamw/triton_mt_table.py --json > "$W/train/optim-host.json"
  echo "optim host rc=$?"; cat "$W/train/optim-host.json"
  tar -czf "$OUT/train.tgz" -C "$W" train
}

phase_fallback() {  # the library's attention backward without a backward kernel: SDPA's own vs exact fp32
  mkdir -p "$W/train"
  timeout 60 python3 benchmarks/attention_fallback_bwd.py --device cuda --dtype bfloat16 --json \
    > "$W/train/attention-fallback-bwd.json"
  echo "attention fallback backward rc=$?"; cat "$W/train/attention-fallback-bwd.json"
  tar -czf "$OUT/train.tgz" -C "$W" train
}

phase_bench() {
  local -x KERNELTUNE_REGISTRY=""  # empty: the shipped registry (this phase never serves from a scratch one)
  DL=$(( $(left) - T_ATTN - 60 )); [ "$DL" -gt "$BENCH_S" ] && DL=$BENCH_S; [ "$DL" -lt 60 ] && DL=60
  echo "bench deadline $DL s"
  T0=$SECONDS
  # the rows so far, copied into $OUT every 15 s: a call that the device's time limit ends mid-bench still
  # returns them (bench-partial.csv; removed once bench.tgz holds the whole run)
  ( while sleep 15; do cp -f "$W/bench/issue8.csv" "$OUT/bench-partial.csv" 2>/dev/null; done ) &
  local mirror=$!
  timeout -k 5 "$((DL + 40))" python3 benchmarks/bench_gpu.py --out "$W/bench" --db "$KERNELTUNE_DB" \
    --deadline "$DL" --compile-n 4096 ${BENCH_ARGS:-}
  echo "bench rc=$? in $((SECONDS - T0)) s"
  kill "$mirror" 2>/dev/null; wait "$mirror" 2>/dev/null
  timeout 25 python3 benchmarks/plot_gpu.py "$W/bench/issue8.csv" --out "$W/bench" || echo "plots: not made here (rebuild from the CSV)"
  tar -czf "$OUT/bench.tgz" -C "$W" bench && rm -f "$OUT/bench-partial.csv"
}

phase_tests() {
  local -x KERNELTUNE_REGISTRY=""
  T0=$SECONDS
  # TEST_SHARDS pytest processes at once (benchmarks/gpu/sharded_pytest.py): the time goes to Triton's
  # compiler, one core a process; one log per shard, packed into tests.tgz
  python3 benchmarks/gpu/sharded_pytest.py --shards "${TEST_SHARDS:-8}" --timeout "${T_TESTS:-300}" --verbose \
    --logs "$W/tests" --json "$W/tests/summary.json" -- -m gpu -k "not seed_passes_and_is_timed" \
    tests/test_gpu.py tests/test_attention_kernels.py tests/library/test_gpu_library.py tests/train/test_gpu_train.py
  echo "gpu tests rc=$? in $((SECONDS - T0)) s"
  grep -h -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)" "$W"/tests/shard*.log | sed 's/^/  /' | sort | head -80
  grep -h -E "^(FAILED|ERROR) " "$W"/tests/shard*.log | sed 's/^/  /' | head -20
  tar -czf "$OUT/tests.tgz" -C "$W" tests
}

phase_attn() {
  local -x KERNELTUNE_REGISTRY=""
  T=$(( $(left) - 5 ))
  local cands=candidates/$ATTN_OP start=${ATTN_START:-} bdir=${ATTN_BENCH_DIR:-$W/bench}
  [ -n "$ATTN_ONLY" ] && cands=$(only "$ATTN_OP" $ATTN_ONLY)
  # no start point given: the best variant of a bench run (this call's, or ATTN_BENCH_DIR's) that beat the candidate
  [ -z "$start" ] && [ -s "$bdir/issue8_meta.json" ] && start=$(python3 benchmarks/gpu/bench_best.py "$bdir" "$ATTN_OP" "$cands")
  [ -n "$start" ] && echo "$ATTN_OP search starts at: $start"
  if [ "$T" -ge 90 ]; then  # one search at a time: timings never share the GPU
    local shape; local -a shapes=()
    IFS=';' read -ra list <<< "$ATTN_SHAPES"
    for shape in "${list[@]}"; do shapes+=(--shapes "$shape"); done
    search "$ATTN_OP" "$T" "$ATTN_BUDGET" "$((T - 10))" --candidates "$cands" \
      "${shapes[@]}" --dtype bf16 ${start:+--option "start=$start"}
  else
    echo "$ATTN_OP search: only $T s left, not started"
  fi
  tar -czf "$OUT/search_attn.tgz" -C "$W" search
}

for ph in $PHASES; do
  echo "== phase $ph at $((SECONDS - T_ALL)) s"
  case $ph in
    adamw|train|optim|parts|host|fallback|bench|tests|attn) "phase_$ph" ;;
    *) echo "unknown phase $ph (adamw, train, optim, parts, host, fallback, bench, tests, attn)" ;;
  esac
done
echo "all.sh: $((SECONDS - T_ALL)) s in all; files: $(ls "$OUT" | tr '\n' ' ')"
