#!/usr/bin/env bash
# The next GPU call (docs/benchmarks.md, "Open"): one command of about 9 minutes on a lent H100, in the order of
# what matters most: the bench (all 24 attention shapes forward and backward, AdamW at GPT-2 small) with each
# candidate's variants timed beside it, one optimizer step, the AdamW search (starting at the bench's best
# variant), the step again, the 124M compare if something was promoted.
# Every variant compiles for sm90 with the H100s' Triton 3.6 (benchmarks/results/compile-sm90-triton3.6.txt);
# tests/test_compile_sm90.py checks that each names knobs and values of its template's space.
# Run from the repository root: bash benchmarks/gpu/next.sh   (any variable below can be overridden)
ALSO="attention:GROUP_BY_HEAD=0;attention:TMA=1;attention:PIPE=1"
ALSO+=";attention_backward:GROUP_BY_HEAD=0;attention_backward:TMA=1;attention_backward:BLOCK_N1=128,BLOCK_N2=32"
ALSO+=";attention_backward:ATOMIC_DQ=1,BLOCK_M1=16,BLOCK_N1=128"
ALSO+=";adamw:CACHE=stream;adamw:CACHE=none;adamw:CHUNK=131072;adamw:BLOCK=4096"
ALSO+=";adamw:BLOCK=1024,num_warps=4"
export TOTAL=${TOTAL:-560} PHASES=${PHASES:-bench optim adamw optim train} BENCH_S=${BENCH_S:-290}
export T_ADAM=${T_ADAM:-170} TRAIN_IF_PROMOTED=${TRAIN_IF_PROMOTED-1}
export ADAM_ONLY=${ADAM_ONLY-triton_mt_table triton_multitensor}
export BENCH_ARGS=${BENCH_ARGS:---compile-ops attention --also $ALSO}
exec bash "$(dirname "$0")/all.sh"
